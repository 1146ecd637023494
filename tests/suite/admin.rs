//! The admin listener: health, readiness and the loaded policy, on its own address, never on
//! the data listener.

use crate::support::client::{self, request};
use crate::support::proxy::{APP, HOME_IP, PolicySpec, payments_dataset};
use crate::support::upstream::{Reply as Serve, Upstream};

#[tokio::test]
async fn health_readiness_and_policy_are_served_on_the_admin_address_only() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let mut proxy = PolicySpec::new()
        .with_parties()
        .upstream("cn-store", &home.url())
        .toml(&payments_dataset("cn-store", "consent", "consent"))
        .start()
        .await;
    let admin = proxy.running().admin_addr;
    assert_ne!(admin, proxy.addr);

    let r = client::send(
        "127.0.0.1",
        admin,
        request("GET", "/healthz").body(client::empty()).unwrap(),
    )
    .await;
    assert_eq!((r.status, r.text().trim()), (200, "ok"));

    let r = client::send(
        "127.0.0.1",
        admin,
        request("GET", "/readyz").body(client::empty()).unwrap(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["ready"], true);

    let r = client::send(
        "127.0.0.1",
        admin,
        request("GET", "/v1/policy").body(client::empty()).unwrap(),
    )
    .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["name"], "itest");
    let hash = proxy.running().shared.snapshot.load().policy.hash.clone();
    assert_eq!(v["hash"], &*hash);
    assert!(v["loaded_at"].as_str().unwrap().ends_with('Z'));

    // The data listener does not answer admin paths: they are ordinary requests there.
    let r = client::get(APP, proxy.addr, "/healthz", &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "no_route");
    proxy.shutdown().await;
}

/// `POST /v1/log/rotate` rotates the decision log as SIGUSR1 does, behind the admin token; the
/// chain goes on in the new file and the whole log verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_rotates_on_an_admin_call_with_the_token() {
    use crate::support::registry::{TOKEN, admin};
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let mut proxy = PolicySpec::new()
        .with_parties()
        .admin_token(TOKEN)
        .upstream("cn-store", &home.url())
        .toml(&payments_dataset("cn-store", "consent", "consent"))
        .start()
        .await;
    let before = client::get(APP, proxy.addr, "/payments/u1/a.json", &[]).await;
    assert_eq!(before.status, 200);

    let r = admin(&proxy, "POST", "/v1/log/rotate", None, None).await;
    assert_eq!(r.status, 401);
    let r = admin(&proxy, "POST", "/v1/log/rotate", Some("wrong"), None).await;
    assert_eq!(r.status, 401);
    let r = admin(&proxy, "POST", "/v1/log/rotate", Some(TOKEN), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rotated = std::path::PathBuf::from(r.json()["rotated"].as_str().unwrap());
    let first = std::fs::read_to_string(&rotated).unwrap();
    assert!(first.contains(&before.decision_id()), "{first}");

    let after = client::get(APP, proxy.addr, "/payments/u1/b.json", &[]).await;
    assert_eq!(after.status, 200);
    proxy.log.outcome(&after.decision_id()).await;
    assert!(!first.contains(&after.decision_id()));
    proxy.shutdown().await;
    let report = residency_proxy::audit::read::verify::verify(&proxy.log.path)
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(report.files >= 2, "{report:?}");
}
