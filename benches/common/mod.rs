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

/// A store at 127.0.0.2 (placed at home) answering every request with `body`, on a thread
/// of its own. `uncounted` runs first on each of its threads: an allocation-counting bench
/// leaves the store's allocations out of what it counts.
pub fn start_upstream(body: bytes::Bytes, uncounted: fn()) -> std::net::SocketAddr {
    use http_body_util::Full;
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    let listener = std::net::TcpListener::bind("127.0.0.2:0").expect("bind upstream");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        uncounted();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_start(uncounted)
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let body = body.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req: hyper::Request<Incoming>| {
                        let body = body.clone();
                        async move { Ok::<_, hyper::Error>(hyper::Response::new(Full::new(body))) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    });
    addr
}

/// The load benchmarks' policy in `dir` (one worker; the consent check and the signed log
/// on), with a consent for `u1`, a signing key, and `proxy_keys` added to `[proxy]`.
pub fn write_load_setup(
    dir: &std::path::Path,
    name: &str,
    upstream: std::net::SocketAddr,
    proxy_keys: &str,
) -> std::path::PathBuf {
    let key = dir.join("log-signing.key");
    std::fs::write(
        &key,
        residency_proxy::audit::keys::SigningKey::generate_pem(),
    )
    .unwrap();
    let consents = dir.join("consents.jsonl");
    std::fs::write(
        &consents,
        r#"{"id":"c-bench-1","subject":"u1","recipient":"bureau","purposes":["credit_scoring"],"categories":["user.financial"],"destinations":["US"],"method":"explicit","granted_at":"2026-01-01T00:00:00Z","expires_at":"2036-01-01T00:00:00Z"}
"#,
    )
    .unwrap();
    let policy = dir.join("policy.toml");
    let extra = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\nworkers = 1\n{proxy_keys}\
         [consent]\nstore = \"file:{}\"\npurpose_header = \"X-Purpose\"\n\
         [log]\npath = \"{}\"\nsigning_key = \"{}\"\ndurability = \"write\"\n",
        consents.display(),
        dir.join("logs/decisions.jsonl").display(),
        key.display()
    );
    std::fs::write(&policy, load_policy(name, &upstream.to_string(), &extra)).unwrap();
    policy
}
