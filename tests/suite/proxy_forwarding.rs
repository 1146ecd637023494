//! What the storage servers receive through the real proxy: only from verified addresses,
//! with the original target bytes, Host and signature headers, without hop-by-hop headers;
//! and how the client is found behind a trusted proxy with a real MaxMind database.
//!
//! Addresses: 127.0.0.2 home store (CN), 127.0.0.3 store abroad (US), 127.0.0.10 the
//! first-party app (CN), 127.0.0.20 a foreign credit bureau (US, third party),
//! 127.0.0.60 a trusted load balancer.

use crate::support::body::{Generated, sha256};
use crate::support::client::{self, Conn, HOST, empty, full, request};
use crate::support::mmdb;
use crate::support::proxy::{
    ABROAD_IP, APP, BUREAU, HOME_IP, PolicySpec, TestProxy, payments_dataset,
};
use crate::support::upstream::{Reply as Serve, Upstream};
use residency_proxy::proxy::upstream::AddrPool;
use serde_json::Value;
use std::sync::Arc;

const BALANCER: &str = "127.0.0.60";

/// `payments` refusing any transfer abroad or to third parties, on `upstream`.
fn payments(upstream: &str) -> String {
    payments_dataset(upstream, "deny", "deny")
}

/// The home store and a proxy whose only dataset is `payments` on it.
async fn home_only() -> (Upstream, TestProxy) {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let proxy = PolicySpec::new()
        .with_parties()
        .upstream("cn-store", &home.url())
        .toml(&payments("cn-store"))
        .start()
        .await;
    (home, proxy)
}

/// The upstream `localhost:PORT` resolves to 127.0.0.1; whether the proxy may use it
/// depends only on where the policy places 127.0.0.1, never on the name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_name_resolving_abroad_is_never_connected_to() {
    for (country, status) in [("US", 451), ("CN", 200)] {
        let store = Upstream::start("127.0.0.1", Serve::Ok).await;
        let url = format!("http://localhost:{}", store.addr.port());
        let proxy = PolicySpec::new()
            .with_parties()
            .network("127.0.0.1/32", country)
            .network("::1/128", "US")
            .upstream("named-store", &url)
            .toml(&payments("named-store"))
            .start()
            .await;
        let r = client::get(APP, proxy.addr, "/payments/u1/2026-01.json", &[]).await;
        assert_eq!(r.status, status, "127.0.0.1 in {country}: {}", r.text());
        let rec = proxy.log.decision(&r.decision_id());
        assert_eq!(rec["upstream"]["name"], "named-store");
        assert_eq!(rec["upstream"]["addr"], store.addr.to_string());
        assert_eq!(rec["upstream"]["country"], country);
        if status == 451 {
            assert_eq!(rec["reason"], "upstream_outside_jurisdiction");
            assert_eq!(r.json()["error"], "upstream_outside_jurisdiction");
            assert_eq!(
                store.connections(),
                0,
                "the proxy connected to a store abroad"
            );
            assert_eq!(store.requests(), 0);
        } else {
            assert_eq!(rec["reason"], "domestic");
            assert_eq!(store.requests(), 1);
        }
    }
}

/// A lax `/public/` dataset must not become a way into the strict `/payments/` one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_cannot_reach_a_stricter_dataset_through_a_laxer_one() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let abroad = Upstream::start(ABROAD_IP, Serve::Ok).await;
    let proxy = PolicySpec::new()
        .with_parties()
        .upstream("cn-store", &home.url())
        .upstream("us-store", &abroad.url())
        .toml(&payments("cn-store"))
        .toml(
            r#"
[[datasets]]
name = 'public'
match = { path_prefix = '/public/' }
upstream = 'us-store'
category = 'system.operations'
resident = false
cross_border = 'allow'
third_party = 'allow'
"#,
        )
        .start()
        .await;

    // The lax dataset works for what it is meant for.
    let r = client::get(BUREAU, proxy.addr, "/public/rates.json", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(abroad.requests(), 1);

    // Dot segments and empty segments that move a request into another dataset are refused:
    // the upstream receives the original bytes and might read them literally.
    for target in [
        "/public/../payments/u1/x",
        "//payments/u1/x",
        "/public/./../payments/u1/x",
        "/payments/u2/../u1/x",
    ] {
        let r = client::get(BUREAU, proxy.addr, target, &[]).await;
        assert_eq!(r.status, 400, "{target}: {}", r.text());
        assert_eq!(r.json()["error"], "ambiguous_path", "{target}");
        let rec = proxy.log.decision(&r.decision_id());
        assert_eq!(rec["reason"], "ambiguous_path", "{target}");
    }
    // Where resolving changes nothing the policy looks at, the request is decided as usual.
    let r = client::get(BUREAU, proxy.addr, "/payments/u1/./x", &[]).await;
    assert_eq!(r.status, 451, "{}", r.text());
    assert_eq!(
        proxy.log.decision(&r.decision_id())["reason"],
        "cross_border_denied"
    );
    for target in [
        "/public/%2e%2e/payments/u1/x",
        "/public/..%2fpayments/u1/x",
        "/public%2F..%2Fpayments",
        "/public/%2E%2E/payments/u1/x",
        "/public/..%5Cpayments/u1/x",
        "/public/%2E./payments/u1/x",
    ] {
        let r = client::get(BUREAU, proxy.addr, target, &[]).await;
        assert_eq!(r.status, 400, "{target}: {}", r.text());
        assert_eq!(r.json()["error"], "ambiguous_path", "{target}");
    }
    assert_eq!(home.requests(), 0);
    assert_eq!(abroad.requests(), 1);

    // Forwarded requests carry the target exactly as the client wrote it.
    for target in [
        "/payments/u1//./x",
        "/payments/u1/a%20b%41?x=1&y=%2F",
        "/payments/u1/x/../y",
    ] {
        let r = client::get(APP, proxy.addr, target, &[]).await;
        assert_eq!(r.status, 200, "{target}: {}", r.text());
        assert_eq!(home.last().target, target);
        let rec = proxy.log.decision(&r.decision_id());
        assert_eq!(rec["dataset"], "payments");
    }
}

/// What an S3 client signs (Host, the signed `x-amz-*` headers, the Authorization header)
/// arrives unchanged; hop-by-hop headers do not; one `X-Forwarded-For` hop is added.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_requests_arrive_unchanged_except_hop_by_hop_headers() {
    let (home, proxy) = home_only().await;
    let host = "payments-bucket.s3.cn-north-1.amazonaws.com.cn";
    let auth = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261128/cn-north-1/s3/aws4_request, \
                SignedHeaders=host;x-amz-content-sha256;x-amz-date, \
                Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7";
    let body = b"{\"records\":[1,2,3]}".to_vec();
    let digest = sha256(&body);
    let req = http::Request::builder()
        .method("PUT")
        .uri("/payments/u1/2026-01.json?x-id=PutObject")
        .header("host", host)
        .header("authorization", auth)
        .header("x-amz-date", "20261128T043153Z")
        .header("x-amz-content-sha256", &digest)
        .header("connection", "keep-alive, x-session-hop")
        .header("x-session-hop", "drop me")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic cHJveHk6c2VjcmV0")
        .header("x-forwarded-for", "198.51.100.7")
        .body(full(body.clone()))
        .unwrap();
    let r = client::send(APP, proxy.addr, req).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = proxy.log.decision(&r.decision_id());
    assert_eq!(rec["id"], r.decision_id());
    assert_eq!(rec["request"]["host"], host);

    let seen = home.last();
    let h = |n: &str| seen.headers.get(n).map(|v| v.to_str().unwrap().to_string());
    assert_eq!(seen.method, "PUT");
    assert_eq!(seen.target, "/payments/u1/2026-01.json?x-id=PutObject");
    assert_eq!(h("host").as_deref(), Some(host));
    assert_eq!(h("authorization").as_deref(), Some(auth));
    assert_eq!(h("x-amz-date").as_deref(), Some("20261128T043153Z"));
    assert_eq!(h("x-amz-content-sha256"), Some(digest.clone()));
    assert_eq!(seen.body_sha256, digest);
    for gone in [
        "x-session-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "transfer-encoding",
    ] {
        assert_eq!(h(gone), None, "{gone} was forwarded");
    }
    // hyper's client may add its own `connection` header, but never the client's.
    assert!(
        h("connection").is_none_or(|c| !c.contains("x-session-hop")),
        "{:?}",
        h("connection")
    );
    // The client's own X-Forwarded-For is not believed (the app is no trusted proxy) but it
    // is kept, with the app's address appended.
    assert_eq!(
        h("x-forwarded-for").as_deref(),
        Some("198.51.100.7, 127.0.0.10")
    );
    // The Authorization header is masked in the log.
    assert!(
        !std::fs::read_to_string(&proxy.log.path)
            .unwrap()
            .contains("AKIDEXAMPLE")
    );
}

/// Two requests on one client connection are both answered, and the proxy reuses its
/// pooled connection to the store for the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_on_both_sides() {
    let (home, proxy) = home_only().await;
    let pool: Arc<AddrPool> = {
        let snap = proxy.running().shared.snapshot.load();
        snap.upstreams[0]
            .resolved()
            .pool(home.addr)
            .cloned()
            .expect("a pool for the store")
    };
    let mut conn = Conn::open(APP, proxy.addr).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let req = request("GET", &format!("/payments/u1/{i}.json"))
            .body(empty())
            .unwrap();
        let r = conn.send(req).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(home.last().target, format!("/payments/u1/{i}.json"));
        ids.push(r.decision_id());
        // The connection goes back to the pool once the response has been read whole.
        crate::support::wait_until("the upstream connection back in the pool", || {
            pool.idle() == 1
        })
        .await;
    }
    assert_eq!(home.requests(), 3);
    assert_eq!(
        home.connections(),
        1,
        "the pooled connection was not reused"
    );
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "each request has its own decision id");
}

/// Bodies of every size and both framings reach the store byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_arrive_intact() {
    let (home, proxy) = home_only().await;
    let mut conn = Conn::open(APP, proxy.addr).await;
    for (method, len, chunked) in [
        ("POST", 0u64, false),
        ("PUT", 1, false),
        ("POST", 3 * 1024 * 1024 + 17, false),
        ("PUT", 1024 * 1024 + 3, true),
    ] {
        let body = if chunked {
            Generated::chunked(len, 16 * 1024 + 1)
        } else {
            Generated::new(len, 16 * 1024 + 1)
        };
        use http_body_util::BodyExt;
        let req = request(method, "/payments/u1/upload.bin")
            .body(body.boxed())
            .unwrap();
        let r = conn.send(req).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let seen = home.last();
        assert_eq!(seen.method, method);
        assert_eq!(seen.body_len, len, "{method} {len}");
        assert_eq!(seen.body_sha256, Generated::sha256(len, 16 * 1024 + 1));
        let out = proxy.log.outcome(&r.decision_id()).await;
        assert_eq!(out["bytes_in"], len);
        assert_eq!(out["complete"], true);
    }
}

/// A public address passed on by a trusted load balancer is located with the MaxMind
/// database; the same header from anyone else is ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_proxy_passes_the_client_address_which_the_database_locates() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("country.mmdb");
    std::fs::write(
        &db,
        mmdb::maxmind_country_db(&[("8.8.8.0/24", "US"), ("114.114.114.0/24", "CN")]),
    )
    .unwrap();
    let proxy = PolicySpec::new()
        .with_parties()
        .proxy("trusted_proxies = ['127.0.0.60/32']")
        .upstream("cn-store", &home.url())
        .toml(&format!("[geo]\ndatabase = '{}'\n", db.display()))
        .toml(&payments("cn-store"))
        .toml(
            r#"
[[datasets]]
name = 'catalog'
match = { path_prefix = '/catalog/' }
upstream = 'cn-store'
category = 'system.operations'
cross_border = 'deny'
third_party = 'allow'
"#,
        )
        .start()
        .await;
    let label = format!("GeoLite2-Country {}", mmdb::BUILD_DATE);

    // Through the balancer: the client is 8.8.8.8, in the US by the database.
    let xff = [("X-Forwarded-For", "8.8.8.8, 127.0.0.60")];
    let r = client::get(BALANCER, proxy.addr, "/catalog/rates.json", &xff).await;
    assert_eq!(r.status, 451, "{}", r.text());
    let rec = proxy.log.decision(&r.decision_id());
    assert_eq!(rec["reason"], "cross_border_denied");
    assert_eq!(rec["client"]["ip"], "8.8.8.8");
    assert_eq!(rec["client"]["via"], BALANCER);
    assert_eq!(rec["client"]["country"], "US");
    assert_eq!(rec["client"]["source"], "database");
    assert_eq!(rec["geo_db"], label.as_str());
    assert_eq!(
        rec["request"]["headers"]["x-forwarded-for"],
        "8.8.8.8, 127.0.0.60"
    );

    // A domestic client behind the same balancer.
    let xff = [("X-Forwarded-For", "114.114.114.114")];
    let r = client::get(BALANCER, proxy.addr, "/catalog/rates.json", &xff).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = proxy.log.decision(&r.decision_id());
    assert_eq!(rec["client"]["ip"], "114.114.114.114");
    assert_eq!(rec["client"]["country"], "CN");
    assert_eq!(rec["reason"], "domestic");
    // The store sees the whole chain, the balancer appended.
    assert_eq!(
        home.last().headers["x-forwarded-for"],
        "114.114.114.114, 127.0.0.60"
    );

    // The app is not a trusted proxy: its header names nobody.
    let xff = [("X-Forwarded-For", "8.8.8.8")];
    let r = client::get(APP, proxy.addr, "/catalog/rates.json", &xff).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rec = proxy.log.decision(&r.decision_id());
    assert_eq!(rec["client"]["ip"], APP);
    assert_eq!(rec["client"]["via"], Value::Null);
    assert_eq!(rec["client"]["country"], "CN");
    assert_eq!(rec["client"]["source"], "override");
    assert_eq!(rec["request"]["headers"].get("x-forwarded-for"), None);
    assert_eq!(HOST, rec["request"]["host"]);
}

/// An HTTP/2 client may split `Cookie` into one field per cookie; the HTTP/1.1 store gets
/// them joined in one field, as RFC 9113 asks (some servers read only the first line).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookies_split_by_an_http2_client_reach_an_http11_store_joined() {
    let (home, proxy) = home_only().await;
    let mut h2 = Conn::open_h2c(APP, proxy.addr).await;
    let req = request("GET", "/payments/u1/a.json")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(empty())
        .unwrap();
    assert_eq!(h2.send(req).await.status, 200);
    let seen = home.last();
    let cookies: Vec<_> = seen.headers.get_all("cookie").iter().collect();
    assert_eq!(cookies, ["a=1; b=2"]);
}
