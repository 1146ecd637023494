//! What the benchmarks share: the policy with 10,000 datasets, a million consents, a request
//! as the proxy hands it to `decide`, and the load benchmarks' policy.

#![allow(dead_code)]

use http::{HeaderMap, Method};
use residency_proxy::consent::ConsentRecord;
use residency_proxy::policy::decide::Request;

pub const DATASETS: usize = 10_000;
pub const CONSENTS: usize = 1_000_000;

/// A policy with `DATASETS` datasets, an app at home and a bureau abroad.
pub fn policy_text() -> String {
    let mut s = String::from(
        "[policy]\nname = \"bench\"\nhome = \"CN\"\n[log]\npseudonymize = false\n\
         [[networks]]\ncidr = \"127.0.0.2/32\"\ncountry = \"CN\"\n\
         [[networks]]\ncidr = \"127.0.0.10/32\"\ncountry = \"CN\"\n\
         [[networks]]\ncidr = \"127.0.0.20/32\"\ncountry = \"US\"\n\
         [[upstreams]]\nname = \"store\"\nurl = \"http://127.0.0.2:9000\"\n\
         [[recipients]]\nid = \"app\"\nrelation = \"first_party\"\ncountry = \"CN\"\nnetworks = [\"127.0.0.10/32\"]\n\
         [[recipients]]\nid = \"bureau\"\nrelation = \"third_party\"\ncountry = \"US\"\nnetworks = [\"127.0.0.20/32\"]\n",
    );
    for i in 0..DATASETS {
        s.push_str(&format!(
            "[[datasets]]\nname = \"ds{i}\"\nmatch = {{ path_prefix = \"/ds{i}/\" }}\nupstream = \"store\"\ncategory = \"user.financial.c{}\"\nsubject = {{ path_segment = 2 }}\n",
            i % 50
        ));
    }
    s
}

/// The load benchmarks' case (the shape of `benches/lib.sh`): the bureau, a US third party at
/// 127.0.0.1, reads the CN store's `payments` (at `store`, 127.0.0.2) under a consent.
/// `extra` holds the tables the benchmark adds (`[proxy]`, `[consent]`, `[log]`).
pub fn load_policy(name: &str, store: &str, extra: &str) -> String {
    format!(
        r#"[policy]
name = "{name}"
home = "CN"
[[networks]]
cidr = "127.0.0.2/32"
country = "CN"
[[networks]]
cidr = "127.0.0.1/32"
country = "US"
[[upstreams]]
name = "store"
url = "http://{store}"
[[recipients]]
id = "bureau"
relation = "third_party"
country = "US"
networks = ["127.0.0.1/32"]
[[datasets]]
name = "payments"
match = {{ path_prefix = "/payments/" }}
upstream = "store"
category = "user.financial"
subject = {{ path_segment = 2 }}
cross_border = "consent"
third_party = "consent"
{extra}"#
    )
}

/// Consent `i`: subject `u{i}`; even ones name `bureau`, odd ones another recipient.
pub fn consent(i: usize) -> ConsentRecord {
    let granted = jiff::Timestamp::from_second(1_767_225_600).unwrap(); // 2026-01-01
    let expires = jiff::Timestamp::from_second(1_893_456_000).unwrap(); // 2030-01-01
    ConsentRecord {
        id: format!("c{i}"),
        subject: format!("u{i}"),
        recipient: if i % 2 == 0 {
            "bureau".into()
        } else {
            "other-bureau".into()
        },
        purposes: vec!["credit_scoring".into()],
        categories: vec!["user.financial".into()],
        destinations: vec!["US".into()],
        method: "explicit".into(),
        granted_at: granted,
        expires_at: expires,
        revoked_at: None,
        evidence: None,
    }
}

/// Consents `0..n`.
pub fn consents(n: usize) -> Vec<ConsentRecord> {
    (0..n).map(consent).collect()
}

/// A request from `peer` as the proxy hands it to `decide`.
pub fn request<'a>(
    method: &'a Method,
    headers: &'a HeaderMap,
    path: &'a str,
    peer: std::net::IpAddr,
) -> Request<'a> {
    Request {
        method,
        host: Some("storage.internal"),
        path,
        query: None,
        headers,
        peer,
        identity: None,
        pick: 0,
        copy_source: residency_proxy::policy::decide::Copied::Nothing,
    }
}
