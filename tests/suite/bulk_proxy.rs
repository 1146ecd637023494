//! Bulk objects through the real proxy: a dataset whose objects are records (an export, a
//! feed) leaves filtered record by record, each record only with its own subject's consent,
//! from a real storage server; the response says nothing of the unfiltered object; the log
//! names every subject whose records left before they left, and counts what was dropped.

use crate::support::client::{self, Conn, request};
use crate::support::objects::{Object, Objects};
use crate::support::proxy::{BUREAU, HOME_IP, PolicySpec, TestProxy, consent};
use residency_proxy::consent::ConsentRecord;
use std::collections::BTreeMap;
use std::io::{Read, Write};

pub const PURPOSE: (&str, &str) = ("X-Purpose", "credit_scoring");

/// The export's records and what the filter must make of each: a subject per state the
/// registry can be in, a record without the subject field and a line that is not JSON.
pub const EXPORT: &str = concat!(
    "{\"user_id\":\"u-ok\",\"amount\":1}\n",
    "{\"user_id\":\"u-none\",\"amount\":2}\n",
    "{\"user_id\":\"u-revoked\",\"amount\":3}\n",
    "{\"user_id\":\"u-ok\",\"amount\":4}\r\n",
    "{\"user_id\":\"u-expired\",\"amount\":5}\n",
    "{\"user_id\":\"u-ticked\",\"amount\":6}\n",
    "{\"user_id\":\"u-elsewhere\",\"amount\":7}\n",
    "{\"user_id\":\"u-marketing\",\"amount\":8}\n",
    "{\"amount\":9}\n",
    "{\"user_id\":\"u-ok\",\"amount\":10 oops\n",
    "{\"user_id\":\"u-too\",\"amount\":11}",
);

/// The records of [`EXPORT`] that leave, in order, byte for byte.
pub const KEPT: &str = concat!(
    "{\"user_id\":\"u-ok\",\"amount\":1}\n",
    "{\"user_id\":\"u-ok\",\"amount\":4}\r\n",
    "{\"user_id\":\"u-too\",\"amount\":11}",
);

/// The consents of [`EXPORT`]'s subjects: valid for u-ok and u-too, and each other way a
/// consent can fail.
pub fn consents() -> Vec<ConsentRecord> {
    let bureau = |id: &str, subject: &str| consent(id, subject, "credit-bureau-us");
    let now = jiff::Timestamp::now();
    vec![
        bureau("c-ok", "u-ok"),
        bureau("c-too", "u-too"),
        ConsentRecord {
            revoked_at: Some(now - jiff::SignedDuration::from_secs(10)),
            ..bureau("c-revoked", "u-revoked")
        },
        ConsentRecord {
            granted_at: now - jiff::SignedDuration::from_hours(48),
            expires_at: now - jiff::SignedDuration::from_hours(24),
            ..bureau("c-expired", "u-expired")
        },
        ConsentRecord {
            method: "pre_ticked".into(),
            ..bureau("c-ticked", "u-ticked")
        },
        ConsentRecord {
            destinations: vec!["DE".into()],
            ..bureau("c-elsewhere", "u-elsewhere")
        },
        ConsentRecord {
            purposes: vec!["marketing".into()],
            ..bureau("c-marketing", "u-marketing")
        },
    ]
}

/// What [`EXPORT`] drops, by reason, as the outcome record counts it.
pub fn dropped() -> serde_json::Value {
    serde_json::json!({
        "consent_expired": 1,
        "consent_method_invalid": 1,
        "consent_missing": 1,
        "consent_revoked": 1,
        "consent_scope_mismatch": 2,
        "no_subject": 1,
        "unparsable": 1,
    })
}

/// A records dataset `exports` (JSON lines, subject `user_id`; a CSV one, `tables`, subject
/// column `user_id`; a Parquet one, `columns`, subject `user.id`) on `store`, consent
/// needed abroad and for third parties, in `mode`.
pub fn bulk_policy(store: &Objects, mode: &str) -> PolicySpec {
    let datasets = format!(
        r#"
[[datasets]]
name = 'exports'
match = {{ path_prefix = '/exports/' }}
upstream = 'cn-store'
category = 'user.financial'
records = {{ format = 'jsonl', subject = 'user_id' }}
mode = '{mode}'

[[datasets]]
name = 'tables'
match = {{ path_prefix = '/tables/' }}
upstream = 'cn-store'
category = 'user.financial'
records = {{ format = 'csv', subject = 'user_id' }}
mode = '{mode}'

[[datasets]]
name = 'columns'
match = {{ path_prefix = '/columns/' }}
upstream = 'cn-store'
category = 'user.financial'
records = {{ format = 'parquet', subject = 'user.id' }}
mode = '{mode}'
"#
    );
    PolicySpec::new()
        .with_parties()
        .upstream("cn-store", &store.url())
        .toml(&datasets)
}

/// The bureau reads `path` (with its purpose and `extra` headers) over one connection.
pub async fn bureau_gets(proxy: &TestProxy, path: &str, extra: &[(&str, &str)]) -> client::Reply {
    let mut req = request("GET", path).header(PURPOSE.0, PURPOSE.1);
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    client::send(BUREAU, proxy.addr, req.body(client::empty()).unwrap()).await
}

/// The disclosure records of decision `id`.
pub fn disclosures(proxy: &TestProxy, id: &str) -> Vec<serde_json::Value> {
    proxy
        .log
        .of_kind("disclosure")
        .into_iter()
        .filter(|r| r["id"] == id)
        .collect()
}

/// `[subject, consent]` pairs the disclosures of `id` name, in order.
pub fn named(proxy: &TestProxy, id: &str) -> Vec<(String, serde_json::Value)> {
    disclosures(proxy, id)
        .iter()
        .flat_map(|d| d["subjects"].as_array().unwrap().clone())
        .map(|p| (p[0].as_str().unwrap().to_string(), p[1].clone()))
        .collect()
}

fn objects(list: &[(&str, Object)]) -> BTreeMap<String, Object> {
    list.iter()
        .map(|(k, o)| (k.to_string(), o.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_records_of_consenting_subjects_leave_and_the_log_names_them_first() {
    let store = Objects::start(
        HOME_IP,
        objects(&[("/exports/spending/2026-11.jsonl", Object::new(EXPORT))]),
    )
    .await;
    let mut proxy = bulk_policy(&store, "enforce")
        .log("pseudonymize = false")
        .consents(consents())
        .start()
        .await;
    let r = bureau_gets(&proxy, "/exports/spending/2026-11.jsonl", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), KEPT);
    // Nothing that described the unfiltered object is passed on.
    for gone in [
        "content-length",
        "etag",
        "accept-ranges",
        "x-amz-checksum-sha256",
    ] {
        assert!(r.header(gone).is_none(), "{gone}: {:?}", r.headers);
    }
    assert_eq!(
        r.header("last-modified"),
        Some("Tue, 01 Dec 2026 00:00:00 GMT")
    );

    let id = r.decision_id();
    let decision = proxy.log.decision(&id);
    assert_eq!(decision["reason"], "consent_filtered");
    assert_eq!(decision["decision"], "allow");
    assert_eq!(decision["rule"], "datasets.exports.cross_border");
    assert_eq!(
        named(&proxy, &id),
        [
            ("u-ok".to_string(), serde_json::json!("c-ok")),
            ("u-too".to_string(), serde_json::json!("c-too"))
        ]
    );
    let outcome = proxy.log.outcome(&id).await;
    assert_eq!(outcome["complete"], true);
    assert_eq!(outcome["records"]["kept"], 3);
    assert_eq!(outcome["records"]["kept_bytes"], KEPT.len());
    assert_eq!(outcome["records"]["dropped"], dropped());
    assert_eq!(outcome["bytes_out"], KEPT.len());
    // Every disclosure precedes the outcome, and follows the decision, in the chain.
    let seq = |r: &serde_json::Value| r["seq"].as_u64().unwrap();
    for d in disclosures(&proxy, &id) {
        assert!(seq(&decision) < seq(&d) && seq(&d) < seq(&outcome), "{d}");
    }
    proxy.shutdown().await;
    let out = crate::support::registry::cli_ok(&[
        "audit",
        "verify",
        &proxy.log.path.display().to_string(),
    ])
    .await;
    assert!(out.starts_with("ok"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_objects_are_filtered_and_compressed_again_the_same_way() {
    let csv = "user_id,note\r\nu-ok,\"keeps, a comma\"\r\nu-none,plain\r\nu-too,\"two\r\nlines \"\"quoted\"\"\"\r\n,no subject\r\n";
    let kept_csv =
        "user_id,note\r\nu-ok,\"keeps, a comma\"\r\nu-too,\"two\r\nlines \"\"quoted\"\"\"\r\n";
    let gzip = {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(csv.as_bytes()).unwrap();
        e.finish().unwrap()
    };
    let zst = zstd::encode_all(EXPORT.as_bytes(), 3).unwrap();
    let store = Objects::start(
        HOME_IP,
        objects(&[
            (
                "/tables/2026-11.csv",
                Object::new(gzip).header("content-encoding", "gzip"),
            ),
            ("/exports/2026-11.jsonl.zst", Object::new(zst)),
        ]),
    )
    .await;
    let mut proxy = bulk_policy(&store, "enforce")
        .consents(consents())
        .start()
        .await;

    let r = bureau_gets(&proxy, "/tables/2026-11.csv", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(&r.body[..])
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, kept_csv);
    let outcome = proxy.log.outcome(&r.decision_id()).await;
    assert_eq!(outcome["records"]["kept"], 2);
    assert_eq!(
        outcome["records"]["dropped"],
        serde_json::json!({"consent_missing": 1, "no_subject": 1})
    );

    let r = bureau_gets(&proxy, "/exports/2026-11.jsonl.zst", &[]).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let text = zstd::decode_all(&r.body[..]).unwrap();
    assert_eq!(String::from_utf8(text).unwrap(), KEPT);
    // Pseudonymised in the log, as every subject is.
    let names = named(&proxy, &r.decision_id());
    assert_eq!(names.len(), 2);
    assert!(
        names.iter().all(|(s, _)| s.starts_with("hmac:")),
        "{names:?}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_is_refused_a_head_shows_no_length_and_errors_pass_unfiltered() {
    let store = Objects::start(
        HOME_IP,
        objects(&[("/exports/a.jsonl", Object::new(EXPORT))]),
    )
    .await;
    let mut proxy = bulk_policy(&store, "enforce")
        .consents(consents())
        .start()
        .await;
    let r = bureau_gets(&proxy, "/exports/a.jsonl", &[("range", "bytes=0-99")]).await;
    assert_eq!(r.status, 416, "{}", r.text());
    assert_eq!(r.json()["error"], "range_on_filtered_dataset");
    assert_eq!(store.requests(), 0, "a refused range reaches no store");

    let req = request("HEAD", "/exports/a.jsonl")
        .header(PURPOSE.0, PURPOSE.1)
        .body(client::empty())
        .unwrap();
    let mut conn = Conn::open(BUREAU, proxy.addr).await;
    let r = conn.send(req).await;
    assert_eq!(r.status, 200);
    for gone in ["content-length", "etag", "x-amz-checksum-sha256"] {
        assert!(r.header(gone).is_none(), "{gone}: {:?}", r.headers);
    }
    assert!(r.body.is_empty());

    // The store's own error is not the object: it passes as it is.
    let r = bureau_gets(&proxy, "/exports/missing.jsonl", &[]).await;
    assert_eq!(r.status, 404);
    assert!(r.text().contains("NoSuchKey"), "{}", r.text());
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_mode_drops_nothing_and_counts_what_it_would_have_dropped() {
    let store = Objects::start(
        HOME_IP,
        objects(&[("/exports/a.jsonl", Object::new(EXPORT))]),
    )
    .await;
    let mut proxy = bulk_policy(&store, "audit")
        .log("pseudonymize = false")
        .consents(consents())
        .start()
        .await;
    let r = bureau_gets(&proxy, "/exports/a.jsonl", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), EXPORT, "audit mode forwards the object whole");
    let id = r.decision_id();
    let decision = proxy.log.decision(&id);
    assert_eq!(decision["reason"], "consent_filtered");
    assert_eq!(decision["enforced"], false);
    let outcome = proxy.log.outcome(&id).await;
    assert_eq!(outcome["records"]["would_drop"], dropped());
    assert_eq!(outcome["records"]["dropped"], serde_json::json!({}));
    // What left without a consent is named too, with none: the log never shows less.
    let names = named(&proxy, &id);
    assert!(
        names.contains(&("u-none".to_string(), serde_json::Value::Null)),
        "{names:?}"
    );
    assert!(
        names.contains(&("u-ok".to_string(), serde_json::json!("c-ok"))),
        "{names:?}"
    );
    proxy.shutdown().await;
}
