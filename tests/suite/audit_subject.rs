//! The pages people read, from the log of a real run: `audit subject` lists exactly that
//! subject's disclosures (with the consent and the bytes delivered) and refused attempts,
//! nothing of another subject's, and refuses to report from a tampered log; `audit report
//! --format html` draws the charts and says whether the log verified. Both open in headless
//! Chromium without a console message.

use crate::support::proxy::{APP, BUREAU, HOME_IP, payments_spec};
use crate::support::upstream::{Reply as Serve, Upstream};
use crate::support::{browser, client};
use serde_json::Value;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_residency-proxy");

fn subject(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("audit")
        .arg("subject")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_subject_sees_their_disclosures_and_refusals_and_nothing_of_anyone_else() {
    let home = Upstream::start(HOME_IP, Serve::Ok).await;
    let mut proxy = payments_spec(&home.url()).start().await;
    let purpose = [("x-purpose", "credit_scoring")];
    // u1: read by the app at home, by the bureau abroad under u1's consent, and refused to
    // the bureau once without a purpose. u2: read by the app, refused to the bureau.
    let at_home = client::get(APP, proxy.addr, "/payments/u1/2026-01.json", &[]).await;
    let abroad = client::get(BUREAU, proxy.addr, "/payments/u1/2026-02.json", &purpose).await;
    let no_purpose = client::get(BUREAU, proxy.addr, "/payments/u1/2026-03.json", &[]).await;
    let other_home = client::get(APP, proxy.addr, "/payments/u2/2026-01.json", &[]).await;
    let other_abroad = client::get(BUREAU, proxy.addr, "/payments/u2/2026-02.json", &purpose).await;
    assert_eq!(
        [
            at_home.status,
            abroad.status,
            no_purpose.status,
            other_home.status,
            other_abroad.status
        ],
        [200, 200, 451, 200, 451]
    );
    proxy.shutdown().await;
    let dir = proxy.dir.path();
    let key = dir.join("log-signing.key").display().to_string();
    let log = proxy.log.path.display().to_string();

    let (code, out, err) = subject(&["u1", "--signing-key", &key, &log]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(
        v["verified"][0].as_str().unwrap().starts_with("ok: "),
        "{v}"
    );
    let r = &v["report"];
    let d = r["disclosures"].as_object().unwrap();
    assert_eq!(
        d.keys().collect::<Vec<_>>(),
        ["credit-bureau-us", "payments-app"]
    );
    let bureau = d["credit-bureau-us"].as_array().unwrap();
    assert_eq!(bureau.len(), 1);
    let b = &bureau[0];
    assert_eq!(b["id"], abroad.decision_id());
    assert_eq!(
        (
            b["reason"].as_str(),
            b["consent_id"].as_str(),
            b["consent_method"].as_str()
        ),
        (Some("consented"), Some("c-1"), Some("explicit"))
    );
    assert_eq!(
        (b["purpose"].as_str(), b["destinations"][0].as_str()),
        (Some("credit_scoring"), Some("US"))
    );
    assert_eq!(b["bytes_delivered"], abroad.body.len() as u64);
    assert_eq!(d["payments-app"][0]["id"], at_home.decision_id());
    assert_eq!(d["payments-app"][0]["reason"], "domestic");
    let refusals = r["refusals"].as_array().unwrap();
    assert_eq!(refusals.len(), 1);
    assert_eq!(refusals[0]["id"], no_purpose.decision_id());
    assert_eq!(refusals[0]["reason"], "purpose_missing");
    // Nothing of u2's, not even an id, and no raw identifier.
    for id in [other_home.decision_id(), other_abroad.decision_id()] {
        assert!(!out.contains(&id), "u2's {id} is in u1's report");
    }
    assert!(
        !out.contains("/payments/"),
        "request paths stay out of the report"
    );

    // The same as a page: self-contained, in words.
    let (code, page, err) = subject(&["u1", "--signing-key", &key, &log, "--format", "html"]);
    assert_eq!(code, 0, "{err}");
    assert!(page.starts_with("<!DOCTYPE html>"));
    for words in [
        "Where your personal data went",
        "credit-bureau-us",
        "allowed by your consent",
        "refused: the request did not say what it was for",
        "What this report can and cannot show",
    ] {
        assert!(page.contains(words), "no \"{words}\" in the page");
    }
    for external in ["<script", "src=", "href=", "http://", "https://"] {
        assert!(!page.contains(external), "the page refers to {external}");
    }
    let subject_html = dir.join("subject.html");
    std::fs::write(&subject_html, &page).unwrap();
    let console = browser::render(&subject_html, &dir.join("subject.png"));
    assert!(console.is_empty(), "the browser complained: {console:?}");

    // The security team's page: charts, and the log's integrity as verify sees it.
    let report = |log: &str| {
        let out = Command::new(BIN)
            .args(["audit", "report", log, "--format", "html"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let page = report(&log);
    for words in [
        "Integrity: verified",
        "Decisions over time, by reason",
        "Refusals by recipient",
        "credit-bureau-us",
        "purpose_missing (1)",
        "What audit mode would have blocked",
    ] {
        assert!(page.contains(words), "no \"{words}\" in the report page");
    }
    assert!(page.matches("<svg").count() >= 4, "charts are inline SVG");
    let report_html = dir.join("report.html");
    std::fs::write(&report_html, &page).unwrap();
    let console = browser::render(&report_html, &dir.join("report.png"));
    assert!(console.is_empty(), "the browser complained: {console:?}");
    // The check can fail: a page that loads something is caught.
    let fetching = dir.join("fetching.html");
    std::fs::write(
        &fetching,
        page.replace("</body>", "<img src=\"http://127.0.0.1:9/x.png\"></body>"),
    )
    .unwrap();
    assert!(!browser::render(&fetching, &dir.join("fetching.png")).is_empty());

    // One record edited: no report, the failure instead.
    let text = std::fs::read_to_string(&proxy.log.path).unwrap();
    let edited = text.replacen("\"status\":451", "\"status\":200", 1);
    assert_ne!(edited, text);
    std::fs::write(&proxy.log.path, edited).unwrap();
    let (code, out, err) = subject(&["u1", "--signing-key", &key, &log, "--format", "html"]);
    assert_eq!(code, 1);
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("hash mismatch") && err.contains("no report is made"),
        "{err}"
    ); // The report page still renders, and says so first.
    let page = report(&log);
    assert!(page.contains("Integrity: NOT VERIFIED") && page.contains("hash mismatch"));
}
