//! TLS from the proxy to `https` upstreams: a private CA named by the upstream's `ca`,
//! HTTP/2 on one shared connection when ALPN agrees (HTTP/1.1 otherwise), the URL's host
//! verified against the certificate, a client certificate for upstreams that require one,
//! and `502 upstream_unreachable` with the reason logged when the certificate is not
//! trusted.
//!
//! 127.0.0.2 is the home store (CN), 127.0.0.10 the first-party app (CN).

use crate::support::client::{self, empty, request};
use crate::support::proxy::{APP, HOME_IP, PolicySpec, TestProxy, payments_dataset};
use crate::support::tls::{H1_ONLY, H2_AND_H1, Pki};
use crate::support::upstream::{Reply as Serve, Upstream};
use residency_proxy::tls::dev::Validity;
use std::sync::Arc;

/// The proxy with one `https` upstream, `cn-store`, and the `payments` dataset on it;
/// `extra` adds keys to the upstream (`ca = …`, `client_cert = …`).
async fn start(store: &Upstream, extra: &str) -> TestProxy {
    PolicySpec::new()
        .with_parties()
        .toml(&format!(
            "[[upstreams]]\nname = 'cn-store'\nurl = '{}'\n{extra}\n",
            store.https_url()
        ))
        .toml(&payments_dataset("cn-store", "consent", "consent"))
        .start()
        .await
}

fn ca_line(pki: &Pki) -> String {
    format!("ca = '{}'", pki.path("ca.crt").display())
}

async fn get(proxy: &TestProxy, target: &str) -> client::Reply {
    client::send(
        APP,
        proxy.addr,
        request("GET", target).body(empty()).unwrap(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_with_a_private_ca_gets_http2_on_one_shared_connection() {
    let pki = Pki::new();
    let tls = pki.upstream_config("store", &[HOME_IP], H2_AND_H1, false);
    let store = Upstream::start_tls(HOME_IP, Serve::Ok, tls).await;
    let proxy = start(&store, &ca_line(&pki)).await;

    let first = get(&proxy, "/payments/u1/2026-01.json").await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.text(), format!("ok from {}", store.addr));
    let seen = store.last();
    assert_eq!(seen.version, http::Version::HTTP_2);
    // The client's Host travels as :authority, unchanged (S3 signatures cover it).
    assert_eq!(seen.authority.as_deref(), Some("storage.test"));
    assert_eq!(seen.target, "/payments/u1/2026-01.json");

    let mut tasks = Vec::new();
    for i in 0..8 {
        let addr = proxy.addr;
        tasks.push(tokio::spawn(async move {
            let req = request("GET", &format!("/payments/u{i}/2026-01.json"))
                .body(empty())
                .unwrap();
            client::send(APP, addr, req).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(store.requests(), 9);
    assert_eq!(
        store.connections(),
        1,
        "HTTP/2 requests share one connection"
    );
    let rec = proxy.log.decision(&first.decision_id());
    assert_eq!(rec["upstream"]["name"], "cn-store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_that_speaks_only_http11_gets_http11() {
    let pki = Pki::new();
    let tls = pki.upstream_config("store", &[HOME_IP], H1_ONLY, false);
    let store = Upstream::start_tls(HOME_IP, Serve::Ok, tls).await;
    let proxy = start(&store, &ca_line(&pki)).await;
    for i in 0..3 {
        let r = get(&proxy, &format!("/payments/u1/{i}.json")).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let seen = store.last();
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(seen.authority.as_deref(), Some("storage.test"));
    // Sequential requests reuse the pooled HTTP/1.1 connection.
    assert_eq!(store.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_upstream_certificate_gives_502_with_the_reason_logged() {
    let pki = Pki::new();
    // Issued by a CA the policy does not name (nor does the platform trust it).
    let stranger = Pki::new();
    let tls = stranger.upstream_config("store", &[HOME_IP], H2_AND_H1, false);
    let store = Upstream::start_tls(HOME_IP, Serve::Ok, tls).await;
    let proxy = start(&store, &ca_line(&pki)).await;

    let r = get(&proxy, "/payments/u1/2026-01.json").await;
    assert_eq!(r.status, 502, "{}", r.text());
    let body = r.json();
    assert_eq!(body["error"], "upstream_unreachable");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("certificate"), "{message}");
    let outcome = proxy.log.outcome(&r.decision_id()).await;
    assert_eq!(outcome["error"], "upstream_unreachable");
    assert_eq!(outcome["status"], 502);
    let detail = outcome["detail"].as_str().unwrap();
    assert!(detail.contains("UnknownIssuer"), "{detail}");
    assert!(detail.contains(&store.addr.to_string()), "{detail}");
    // The decision was made (and logged) before the connection was tried.
    let rec = proxy.log.decision(&r.decision_id());
    assert_eq!(rec["upstream"]["addr"], store.addr.to_string());
    assert_eq!(store.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_certificate_for_another_host_is_refused() {
    let pki = Pki::new();
    let tls = pki.upstream_config("store", &["127.0.0.9", "other.test"], H2_AND_H1, false);
    let store = Upstream::start_tls(HOME_IP, Serve::Ok, tls).await;
    let proxy = start(&store, &ca_line(&pki)).await;
    let r = get(&proxy, "/payments/u1/2026-01.json").await;
    assert_eq!(r.status, 502, "{}", r.text());
    let outcome = proxy.log.outcome(&r.decision_id()).await;
    let detail = outcome["detail"].as_str().unwrap();
    assert!(
        detail.contains("not valid for name \"127.0.0.2\""),
        "{detail}"
    );
    assert_eq!(store.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_requires_a_client_certificate_gets_the_configured_one() {
    let pki = Pki::new();
    let tls: Arc<rustls::ServerConfig> = pki.upstream_config("store", &[HOME_IP], H2_AND_H1, true);
    let store = Upstream::start_tls(HOME_IP, Serve::Ok, tls).await;

    // Without a client certificate the upstream refuses the proxy.
    let proxy = start(&store, &ca_line(&pki)).await;
    let r = get(&proxy, "/payments/u1/2026-01.json").await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(store.requests(), 0);

    let sidecar = pki
        .ca
        .client("spiffe://cn/residency-proxy", Validity::days(30))
        .unwrap();
    pki.write("sidecar", &sidecar);
    let with_cert = format!(
        "{}\nclient_cert = '{}'\nclient_key = '{}'",
        ca_line(&pki),
        pki.path("sidecar.crt").display(),
        pki.path("sidecar.key").display()
    );
    let proxy = start(&store, &with_cert).await;
    let r = get(&proxy, "/payments/u1/2026-01.json").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        store.last().client_identity.as_deref(),
        Some("spiffe://cn/residency-proxy")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_upstream_ca_stops_start_up_with_the_upstream_named() {
    let pki = Pki::new();
    let spec = PolicySpec::new()
        .with_parties()
        .toml(&format!(
            "[[upstreams]]\nname = 'cn-store'\nurl = 'https://{HOME_IP}:1'\nca = '{}'\n",
            pki.path("missing.crt").display()
        ))
        .toml(&payments_dataset("cn-store", "consent", "consent"));
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("log-signing.key"),
        residency_proxy::audit::keys::SigningKey::generate_pem(),
    )
    .unwrap();
    std::fs::write(dir.path().join("consents.jsonl"), "").unwrap();
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, spec.render(dir.path())).unwrap();
    let err = residency_proxy::proxy::start(residency_proxy::proxy::ServeConfig {
        policy_path: policy,
        overrides: Default::default(),
    })
    .await
    .err()
    .expect("start-up fails");
    let msg = err.to_string();
    assert!(msg.contains("upstreams.cn-store"), "{msg}");
    assert!(msg.contains("missing.crt"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_time_location_check_refuses_before_any_tls_byte_is_sent() {
    use residency_proxy::policy::model::{Scheme, Upstream as Up};
    use residency_proxy::proxy::upstream::{UpstreamError, connect};
    use tokio::io::AsyncReadExt;

    let pki = Pki::new();
    let listener = tokio::net::TcpListener::bind((HOME_IP, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let up = Up {
        name: "cn-store".into(),
        scheme: Scheme::Https,
        host: HOME_IP.into(),
        port: addr.port(),
        rule: "upstreams.cn-store".into(),
        ca: Some(pki.path("ca.crt")),
        client_cert: None,
    };
    let tls = residency_proxy::tls::UpstreamTls::for_upstream(&up).unwrap();
    let received = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        buf.len()
    });
    // The socket's peer is not where the dataset may go (say DNS changed since the decision).
    let r = connect(
        addr,
        std::time::Duration::from_secs(5),
        |_| false,
        Some(&tls),
    )
    .await;
    assert!(matches!(r, Err(UpstreamError::OutsideHome { .. })));
    assert_eq!(received.await.unwrap(), 0, "no ClientHello was sent");
}

/// Regression: a reload that was rejected had already handed the running upstream its new TLS
/// settings, so a broken edit (here, the wrong CA next to an unreadable one) still cut the
/// store off. Rejected means nothing changed; accepted, the new CA applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_reload_leaves_the_upstream_tls_as_it_was() {
    let pki = Pki::new();
    let other = Pki::new();
    let tls = pki.upstream_config("store", &[HOME_IP], H1_ONLY, false);
    let store = Upstream::start_tls(HOME_IP, Serve::Ok, tls).await;
    // No pooling: every request opens a connection with the upstream's current settings.
    let proxy = PolicySpec::new()
        .with_parties()
        .proxy("upstream_idle_per_address = 0")
        .toml(&format!(
            "[[upstreams]]\nname = 'cn-store'\nurl = '{}'\n{}\n",
            store.https_url(),
            ca_line(&pki)
        ))
        .toml(&payments_dataset("cn-store", "consent", "consent"))
        .start()
        .await;
    assert_eq!(get(&proxy, "/payments/u1/a.json").await.status, 200);

    let good = std::fs::read_to_string(&proxy.policy_path).unwrap();
    let wrong_ca = good.replace(&ca_line(&pki), &ca_line(&other));
    // The second upstream's CA file does not exist: the reload fails while building, after
    // the first upstream's new settings were made.
    let broken = format!(
        "{wrong_ca}\n[[upstreams]]\nname = 'b-store'\nurl = 'https://{HOME_IP}:1'\nca = 'missing-ca.pem'\n"
    );
    std::fs::write(&proxy.policy_path, &broken).unwrap();
    let e = proxy.running().reload().await.unwrap_err().to_string();
    assert!(e.contains("b-store"), "{e}");
    let r = get(&proxy, "/payments/u1/b.json").await;
    assert_eq!(r.status, 200, "{}", r.text());

    std::fs::write(&proxy.policy_path, &wrong_ca).unwrap();
    proxy.running().reload().await.unwrap();
    assert_eq!(get(&proxy, "/payments/u1/c.json").await.status, 502);
}
