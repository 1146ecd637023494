//! TLS termination and mTLS identities through the real proxy, with real handshakes on
//! loopback and certificates made by the code `certs init` runs: who a certificate says the
//! client is, refusals at the handshake, HTTP/2 by ALPN and in the clear, certificates
//! swapped on disk, and `certs init` itself.
//!
//! Loopback addresses stand in for countries: 127.0.0.2 the home store (CN), 127.0.0.10 the
//! first-party app's network (CN), 127.0.0.20 where the bureau calls from (US), 127.0.0.60
//! a trusted load balancer (CN).

use crate::support::client::{Conn, Reply, empty, request};
use crate::support::proxy::{
    APP, BUREAU, HOME_IP, PolicySpec, TestProxy, consent, payments_dataset,
};
use crate::support::tls::{H1_ONLY, H2_AND_H1, Pki, cert_in};
use crate::support::upstream::{Reply as Serve, Upstream};
use residency_proxy::tls::dev::{DevCa, Validity};
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::Ordering;
use std::time::Duration;

const BUREAU_ID: &str = "spiffe://partners/credit-bureau-us";
const APP_ID: &str = "spiffe://home/payments-app";
const BALANCER: &str = "127.0.0.60";

/// The app (first party at home) is known by its network and its certificate; the bureau
/// (third party in the US) by its certificate only.
const CAST: &str = r#"
[[recipients]]
id = 'payments-app'
relation = 'first_party'
country = 'CN'
identities = ['spiffe://home/payments-app']
networks = ['127.0.0.10/32']

[[recipients]]
id = 'credit-bureau-us'
relation = 'third_party'
country = 'US'
identities = ['spiffe://partners/credit-bureau-us']
"#;

fn spec(home: &Upstream) -> PolicySpec {
    PolicySpec::new()
        .proxy("trusted_proxies = ['127.0.0.60/32']")
        .network("127.0.0.10/32", "CN")
        .network("127.0.0.20/32", "US")
        .network("127.0.0.60/32", "CN")
        .network("127.0.0.2/32", "CN")
        .upstream("cn-store", &home.url())
        .toml(CAST)
        .toml(&payments_dataset("cn-store", "consent", "consent"))
        .consents(vec![consent("c-1", "u1", "credit-bureau-us")])
}

async fn start(pki: &Pki, home: &Upstream, mtls: bool) -> TestProxy {
    spec(home).toml(&pki.tls_table(mtls)).start().await
}

fn get(target: &str, headers: &[(&str, &str)]) -> http::Request<crate::support::client::ReqBody> {
    let mut b = request("GET", target);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(empty()).unwrap()
}

const PURPOSE: (&str, &str) = ("x-purpose", "credit_scoring");

/// Polls an async condition every 50 ms for at most 10 s.
async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recipient_identified_by_its_certificate_gets_consent_checked_access() {
    let pki = Pki::new();
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let proxy = start(&pki, &home, true).await;
    let bureau = pki.client_config(Some(&pki.client_cert(BUREAU_ID)), H2_AND_H1);
    // The bureau's address belongs to no recipient: only its certificate names it.
    let mut conn = Conn::open_tls(BUREAU, proxy.addr, bureau).await.unwrap();

    let refused = conn
        .send(get("/payments/u2/2026-01.json", &[PURPOSE]))
        .await;
    assert_eq!(refused.status, 451, "{}", refused.text());
    assert_eq!(refused.json()["error"], "consent_missing");
    let rec = proxy.log.decision(&refused.decision_id());
    assert_eq!(rec["client"]["identity"], BUREAU_ID);
    assert_eq!(rec["client"]["ip"], BUREAU);
    assert_eq!(rec["recipient"]["id"], "credit-bureau-us");

    let allowed = conn
        .send(get("/payments/u1/2026-01.json", &[PURPOSE]))
        .await;
    assert_eq!(allowed.status, 200, "{}", allowed.text());
    let rec = proxy.log.decision(&allowed.decision_id());
    assert_eq!(rec["reason"], "consented");
    assert_eq!(rec["client"]["identity"], BUREAU_ID);
    assert_eq!(rec["consent"]["id"], "c-1");
    assert_eq!(home.requests(), 1);
    let stats = &proxy.running().tls.as_ref().unwrap().stats;
    assert_eq!(stats.handshakes.load(Ordering::Relaxed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_outranks_a_forged_forwarded_header() {
    let pki = Pki::new();
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let proxy = start(&pki, &home, true).await;
    let forged = [("x-forwarded-for", APP), PURPOSE];

    // Through the trusted balancer, claiming to be the app's address: the address is
    // believed, the recipient is still the one the certificate names.
    let bureau = pki.client_config(Some(&pki.client_cert(BUREAU_ID)), H2_AND_H1);
    let mut conn = Conn::open_tls(BALANCER, proxy.addr, bureau).await.unwrap();
    let r = conn.send(get("/payments/u2/2026-01.json", &forged)).await;
    assert_eq!(r.status, 451, "{}", r.text());
    let rec = proxy.log.decision(&r.decision_id());
    assert_eq!(rec["client"]["ip"], APP);
    assert_eq!(rec["recipient"]["id"], "credit-bureau-us");
    assert_eq!(rec["reason"], "consent_missing");

    // The same request with the app's certificate is the app's, at home.
    let app = pki.client_config(Some(&pki.client_cert(APP_ID)), H2_AND_H1);
    let mut conn = Conn::open_tls(BALANCER, proxy.addr, app).await.unwrap();
    let r = conn.send(get("/payments/u2/2026-01.json", &forged)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = proxy.log.decision(&r.decision_id());
    assert_eq!(rec["recipient"]["id"], "payments-app");
    assert_eq!(rec["client"]["identity"], APP_ID);
    assert_eq!(home.requests(), 1);
}

/// Opens a TLS connection and makes one request; `Err` if the handshake or the exchange
/// failed.
async fn attempt(
    proxy: &TestProxy,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> Result<Reply, String> {
    let mut conn = Conn::open_tls(BUREAU, proxy.addr, config).await?;
    conn.try_send(get("/payments/u1/2026-01.json", &[PURPOSE]))
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_certificate_another_cas_certificate_or_an_expired_one_is_refused_at_the_handshake() {
    let pki = Pki::new();
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let proxy = start(&pki, &home, true).await;
    let stats = &proxy.running().tls.as_ref().unwrap().stats;

    let none = pki.client_config(None, H2_AND_H1);
    assert!(attempt(&proxy, none).await.is_err());
    crate::support::wait_until("the no-certificate refusal", || {
        stats.refused_no_certificate.load(Ordering::Relaxed) == 1
    })
    .await;

    let other_ca = DevCa::generate().unwrap();
    let stranger = other_ca.client(BUREAU_ID, Validity::days(30)).unwrap();
    let config = pki.client_config(Some(&stranger), H2_AND_H1);
    assert!(attempt(&proxy, config).await.is_err());
    crate::support::wait_until("the unknown-issuer refusal", || {
        stats.refused_unknown_issuer.load(Ordering::Relaxed) == 1
    })
    .await;

    let expired = pki.ca.client(BUREAU_ID, Validity::expired()).unwrap();
    let config = pki.client_config(Some(&expired), H2_AND_H1);
    assert!(attempt(&proxy, config).await.is_err());
    crate::support::wait_until("the expired refusal", || {
        stats.refused_expired.load(Ordering::Relaxed) == 1
    })
    .await;

    assert_eq!(stats.refused.load(Ordering::Relaxed), 3);
    assert_eq!(stats.handshakes.load(Ordering::Relaxed), 0);
    // Nothing was decided for a client whose identity was not verified.
    assert!(proxy.log.of_kind("decision").is_empty());
    assert_eq!(home.requests(), 0);

    // The valid certificate still gets in.
    let ok = pki.client_config(Some(&pki.client_cert(BUREAU_ID)), H2_AND_H1);
    assert_eq!(attempt(&proxy, ok).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_by_alpn_and_http11_both_work_over_tls() {
    let pki = Pki::new();
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let proxy = start(&pki, &home, true).await;
    let cert = pki.client_cert(BUREAU_ID);

    for (alpn, want) in [
        (H2_AND_H1, http::Version::HTTP_2),
        (H1_ONLY, http::Version::HTTP_11),
        (&[][..], http::Version::HTTP_11),
    ] {
        let config = pki.client_config(Some(&cert), alpn);
        let mut conn = Conn::open_tls(BUREAU, proxy.addr, config).await.unwrap();
        for _ in 0..2 {
            let r = conn
                .send(get("/payments/u1/2026-01.json", &[PURPOSE]))
                .await;
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.version, want);
            assert_eq!(r.text(), format!("ok from {}", home.addr));
            let rec = proxy.log.decision(&r.decision_id());
            assert_eq!(rec["client"]["identity"], BUREAU_ID);
            assert_eq!(rec["request"]["host"], "storage.test");
        }
        // The upstream got the client's Host, whatever the client's protocol.
        assert_eq!(home.last().authority.as_deref(), Some("storage.test"));
    }
    assert_eq!(home.requests(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_with_prior_knowledge_works_on_a_plain_listener() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let proxy = spec(&home).start().await;
    let mut conn = Conn::open_h2c(APP, proxy.addr).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = conn.send(get("/payments/u1/2026-01.json", &[])).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.version, http::Version::HTTP_2);
        ids.push(r.decision_id());
    }
    let rec = proxy.log.decision(&ids[0]);
    assert_eq!(rec["reason"], "domestic");
    assert_eq!(rec["client"]["identity"], serde_json::Value::Null);
    assert_eq!(rec["recipient"]["id"], "payments-app");
    assert_eq!(home.last().authority.as_deref(), Some("storage.test"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_swapped_on_disk_is_served_to_the_next_handshake_while_open_connections_keep_working()
 {
    let pki = Pki::new();
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    // TLS without client certificates: clients are known by their network.
    let proxy = start(&pki, &home, false).await;
    let tls = proxy.running().tls.clone().unwrap();
    let old = cert_in(&pki.path("server.crt"));
    let config = pki.client_config(None, H1_ONLY);
    let mut before = Conn::open_tls(APP, proxy.addr, config.clone())
        .await
        .unwrap();
    assert_eq!(before.peer_cert.as_ref(), Some(&old));
    let r = before.send(get("/payments/u1/a.json", &[])).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        proxy.log.decision(&r.decision_id())["client"]["identity"],
        serde_json::Value::Null
    );

    let next = pki
        .ca
        .server(&["renewed.test".into()], Validity::days(30))
        .unwrap();
    pki.write("server", &next);
    let new = next.cert_der();
    eventually("the new certificate on a new handshake", || {
        let config = config.clone();
        let new = new.clone();
        let addr = proxy.addr;
        async move {
            let c = Conn::open_tls(APP, addr, config).await.unwrap();
            c.peer_cert == Some(new)
        }
    })
    .await;
    assert!(tls.stats.reloads.load(Ordering::Relaxed) >= 1);

    // The connection opened before the swap still carries requests.
    let r = before.send(get("/payments/u1/b.json", &[])).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(home.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_pair_is_rejected_and_the_old_certificate_keeps_serving() {
    let pki = Pki::new();
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let proxy = start(&pki, &home, false).await;
    let tls = proxy.running().tls.clone().unwrap();
    let old = cert_in(&pki.path("server.crt"));
    let config = pki.client_config(None, H2_AND_H1);

    // A new certificate with somebody else's key.
    let cert = pki.ca.server(&[], Validity::days(30)).unwrap();
    let other = pki.ca.server(&[], Validity::days(30)).unwrap();
    std::fs::write(pki.path("server.key"), &other.key_pem).unwrap();
    std::fs::write(pki.path("server.crt"), &cert.cert_pem).unwrap();
    crate::support::wait_until("the rejected reload", || {
        tls.stats.reload_failures.load(Ordering::Relaxed) >= 1
    })
    .await;
    let mut conn = Conn::open_tls(APP, proxy.addr, config.clone())
        .await
        .unwrap();
    assert_eq!(conn.peer_cert.as_ref(), Some(&old));
    assert_eq!(conn.send(get("/payments/u1/a.json", &[])).await.status, 200);

    // SIGHUP's path says why, and changes nothing either.
    let err = proxy.running().reload().await.unwrap_err().to_string();
    assert!(err.contains("cannot be used together"), "{err}");
    assert!(err.contains("server.crt"), "{err}");
    let again = Conn::open_tls(APP, proxy.addr, config.clone())
        .await
        .unwrap();
    assert_eq!(again.peer_cert.as_ref(), Some(&old));

    // A good pair is picked up once the files change again.
    std::fs::write(pki.path("server.key"), &cert.key_pem).unwrap();
    let new = cert.cert_der();
    eventually("the repaired certificate", || {
        let config = config.clone();
        let new = new.clone();
        let addr = proxy.addr;
        async move { Conn::open_tls(APP, addr, config).await.unwrap().peer_cert == Some(new) }
    })
    .await;
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certs_init_writes_certificates_that_a_real_mtls_handshake_accepts() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let work = tempfile::tempdir().unwrap();
    let policy = work.path().join("recipients.toml");
    std::fs::write(&policy, spec(&home).render(work.path())).unwrap();
    let dir = work.path().join("certs");
    let bin = env!("CARGO_BIN_EXE_residency-proxy");
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(bin)
            .args(["certs", "init"])
            .arg(&dir)
            .arg("--policy")
            .arg(&policy)
            .args(["--identity", "auditor.example", "--san", "proxy.internal"])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    run(&[]);
    let bureau = "client-spiffe-partners-credit-bureau-us";
    for key in [
        "ca.key",
        "server.key",
        &format!("{bureau}.key"),
        "client-spiffe-home-payments-app.key",
        "client-auditor.example.key",
        "log-signing.key",
        "admin.token",
    ] {
        assert_eq!(mode(&dir.join(key)), 0o600, "{key}");
    }
    let clients = std::fs::read_to_string(dir.join("clients.txt")).unwrap();
    assert!(
        clients.contains("spiffe-partners-credit-bureau-us spiffe://partners/credit-bureau-us")
    );
    assert!(clients.contains("auditor.example auditor.example"));

    // Run again: everything is kept; with --force everything is new.
    let ca = std::fs::read(dir.join("ca.crt")).unwrap();
    let out = run(&[]);
    for line in out
        .lines()
        .filter(|l| l.ends_with(".crt") || l.ends_with(".key"))
    {
        assert!(line.starts_with("kept"), "{out}");
    }
    assert_eq!(std::fs::read(dir.join("ca.crt")).unwrap(), ca);

    // The proxy serves server.crt, verifies clients against ca.crt, and knows the bureau
    // by the certificate issued for it.
    let pki_dir = |f: &str| dir.join(f).display().to_string();
    let proxy = spec(&home)
        .toml(&format!(
            "[tls]\ncert = '{}'\nkey = '{}'\nclient_ca = '{}'\n",
            pki_dir("server.crt"),
            pki_dir("server.key"),
            pki_dir("ca.crt")
        ))
        .start()
        .await;
    residency_proxy::tls::install_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_in(&dir.join("ca.crt"))).unwrap();
    let chain = vec![cert_in(&dir.join(format!("{bureau}.crt")))];
    let key =
        rustls_pki_types::pem::PemObject::from_pem_file(dir.join(format!("{bureau}.key"))).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(residency_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let mut conn = Conn::open_tls(BUREAU, proxy.addr, std::sync::Arc::new(config))
        .await
        .unwrap();
    let r = conn
        .send(get("/payments/u1/2026-01.json", &[PURPOSE]))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = proxy.log.decision(&r.decision_id());
    assert_eq!(rec["client"]["identity"], BUREAU_ID);
    assert_eq!(rec["recipient"]["id"], "credit-bureau-us");

    let out = run(&["--force"]);
    assert!(out.contains("created"), "{out}");
    assert_ne!(std::fs::read(dir.join("ca.crt")).unwrap(), ca);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_handshake_is_cut_off_after_handshake_timeout() {
    use tokio::io::AsyncReadExt;
    let pki = Pki::new();
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let proxy = spec(&home)
        .proxy("handshake_timeout = '300ms'")
        .toml(&pki.tls_table(true))
        .start()
        .await;
    let stats = &proxy.running().tls.as_ref().unwrap().stats;
    let mut idle = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    // The proxy closes the connection; nothing was ever sent to it.
    let n = tokio::time::timeout(Duration::from_secs(10), idle.read(&mut buf))
        .await
        .expect("the proxy closes the connection")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(started.elapsed() >= Duration::from_millis(250));
    crate::support::wait_until("the timeout refusal", || {
        stats.refused_timeout.load(Ordering::Relaxed) == 1
    })
    .await;
    assert!(proxy.log.of_kind("decision").is_empty());
}
