//! Realistic decision and outcome records for the log benchmarks: the mix of a busy
//! payments sidecar (domestic reads, consented and refused transfers abroad, audit-mode
//! would-denials, unmatched paths), with pseudonymised subjects, about 1 KB a pair.

use residency_proxy::audit::Pseudonymizer;
use residency_proxy::audit::record::{
    ClientRec, ConsentRec, DecisionRecord, Headers, Link, OutcomeRecord, RecipientRec, RequestRec,
    Stamp, UpstreamRec, VERSION,
};
use residency_proxy::policy::Reason;
use residency_proxy::policy::country::Country;
use residency_proxy::policy::model::{Durability, LogSettings, LogTarget, Relation};
use std::sync::Arc;

const POLICY: &str = "sha256:5f0c6f1d1e2a9b7c3d4e5f60718293a4b5c6d7e8f90112233445566778899aabb";

/// Log settings for a benchmark log at `path`: the defaults, with `durability`.
pub fn settings(path: &std::path::Path, durability: Durability) -> LogSettings {
    let policy = residency_proxy::policy::compile::from_str(
        "b.toml",
        "[policy]\nname='b'\nhome='CN'\n[log]\npseudonymize=false\n",
    )
    .unwrap();
    let mut s = policy.log.clone();
    s.target = LogTarget::File(path.into());
    s.durability = durability;
    s
}

/// Decision number `n` of a log, taken at `ts`.
pub fn decision(n: u64, pseudo: &Pseudonymizer, ts: jiff::Timestamp) -> DecisionRecord {
    let subject = pseudo.pseudonym(&format!("user-{}", n % 100_000));
    let (decision, enforced, reason, dataset, recipient, country, status) = match n % 10 {
        0..=4 => (
            "allow",
            true,
            "domestic",
            Some("payments"),
            Some("payments-app"),
            "CN",
            None,
        ),
        5 | 6 => (
            "allow",
            true,
            "consented",
            Some("payments"),
            Some("credit-bureau-us"),
            "US",
            None,
        ),
        7 => (
            "deny",
            true,
            "consent_missing",
            Some("payments"),
            Some("credit-bureau-us"),
            "US",
            Some(451),
        ),
        8 => (
            "deny",
            false,
            "cross_border_denied",
            Some("profiles"),
            Some("credit-bureau-us"),
            "US",
            None,
        ),
        _ => ("deny", true, "no_route", None, None, "DE", Some(404)),
    };
    let ip = match country {
        "CN" => "10.20.1.7",
        "US" => "203.0.113.9",
        _ => "198.51.100.4",
    };
    let path = match dataset {
        Some(d) => format!("/{d}/{subject}/2026-{:02}.json", n % 12 + 1),
        None => format!("/nowhere/{n}"),
    };
    let mut headers = Headers::default();
    let purpose = (recipient == Some("credit-bureau-us")).then(|| "credit_scoring".to_string());
    if let Some(p) = &purpose {
        headers.insert(&http::HeaderName::from_static("x-purpose"), p.clone());
    }
    DecisionRecord {
        instance: None,
        category: dataset.map(|_| Arc::from("user.financial")),
        client: ClientRec {
            country: Country::parse(country),
            identity: None,
            ip: Some(ip.parse().unwrap()),
            source: "override",
            via: None,
        },
        consent: (reason == "consented" || reason == "consent_missing").then(|| ConsentRec {
            id: format!("c-{}", n % 100_000).into(),
            method: (reason == "consented").then(|| "explicit".into()),
            result: if reason == "consented" {
                "valid"
            } else {
                "consent_missing"
            },
            why: None,
        }),
        dataset: dataset.map(Arc::from),
        decision,
        enforced,
        geo_db: Some(Arc::from("GeoLite2-Country 2026-11-25")),
        id: residency_proxy::audit::id::DecisionId::new(ts),
        kind: "decision",
        policy: Arc::from(POLICY),
        policy_revision: None,
        prev: Link::default(),
        purpose,
        reason: Reason::parse(reason).unwrap(),
        recipient: RecipientRec {
            country: recipient.and(Country::parse(country)),
            id: recipient.map(Arc::from),
            relation: if recipient == Some("payments-app") {
                Relation::FirstParty
            } else {
                Relation::ThirdParty
            },
        },
        request: RequestRec {
            headers,
            host: Some("storage.internal".into()),
            method: http::Method::GET,
            path,
            query: None,
        },
        rule: match dataset {
            Some(d) => format!("datasets.{d}.cross_border"),
            None => "policy.unmatched".into(),
        },
        seq: 0,
        status,
        subject: dataset.map(|_| subject),
        trace: None,
        ts: Stamp(ts),
        upstream: status.is_none().then(|| UpstreamRec {
            addr: "10.20.0.5:9000".parse().unwrap(),
            country: Country::parse("CN"),
            name: Arc::from("cn-store"),
        }),
        v: VERSION,
    }
}

/// The outcome record that follows decision `d`.
#[allow(dead_code)] // used by one of the two benchmarks that include this file
pub fn outcome(d: &DecisionRecord, n: u64) -> OutcomeRecord {
    OutcomeRecord {
        instance: None,
        bytes_in: 0,
        bytes_out: if d.status.is_none() {
            1024 + n % 4096
        } else {
            120
        },
        complete: true,
        detail: None,
        duration_ms: 0.5 + (n % 100) as f64 / 50.0,
        error: None,
        id: d.id,
        kind: "outcome",
        prev: Link::default(),
        records: None,
        seq: 0,
        status: d.status.unwrap_or(200),
        ts: d.ts,
        upstream: d.upstream.as_ref().map(|u| u.addr),
        v: VERSION,
    }
}
