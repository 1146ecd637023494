//! SPEC section 9: a policy decision in process, with 10,000 datasets and 1,000,000
//! consents in the index, must take under 1 µs (median). Measures `decide()` exactly as the
//! proxy calls it, for a consented cross-border read, a domestic read and a refusal.

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use residency_proxy::consent::ConsentIndex;
use residency_proxy::geo::Locator;
use residency_proxy::offline::OfflineEnv;
use residency_proxy::policy::compile::from_str;
use residency_proxy::policy::decide::decide;
use residency_proxy::policy::decision::Reason;
use std::hint::black_box;
use std::sync::Arc;

mod common;

use common::{CONSENTS, DATASETS, consents, policy_text, request};

fn bench(c: &mut Criterion) {
    let policy = from_str("bench.toml", &policy_text()).expect("the bench policy compiles");
    let index = Arc::new(ConsentIndex::new());
    index.replace_all(&consents(CONSENTS));
    assert_eq!(index.len(), CONSENTS);
    let locator = Locator::new(&policy, None);
    let now = "2026-11-28T00:00:00Z"
        .parse::<jiff::Timestamp>()
        .unwrap()
        .as_microsecond();
    let env = OfflineEnv::new(&policy, locator, index, now);
    let mut headers = HeaderMap::new();
    headers.insert("x-purpose", HeaderValue::from_static("credit_scoring"));
    let get = Method::GET;
    // Spread requests over datasets and subjects so caches see a realistic working set.
    let paths: Vec<String> = (0..4096)
        .map(|i| {
            format!(
                "/ds{}/u{}/2026-01.json",
                (i * 7919) % DATASETS,
                (i * 104_729 * 2) % CONSENTS
            )
        })
        .collect();
    let bureau: std::net::IpAddr = "127.0.0.20".parse().unwrap();
    let app: std::net::IpAddr = "127.0.0.10".parse().unwrap();
    let req = |path: &'static str, peer: std::net::IpAddr| request(&get, &headers, path, peer);
    let paths: Vec<&'static str> = paths
        .into_iter()
        .map(|p| &*Box::leak(p.into_boxed_str()))
        .collect();
    // Sanity: the three scenarios decide as intended.
    assert_eq!(
        decide(&policy, &env, &req(paths[1], bureau), &mut ()).reason,
        Reason::Consented
    );
    assert_eq!(
        decide(&policy, &env, &req(paths[1], app), &mut ()).reason,
        Reason::Domestic
    );
    assert_eq!(
        decide(&policy, &env, &req("/ds1/u1/x.json", bureau), &mut ()).reason,
        Reason::ConsentMissing
    );

    let mut i = 0usize;
    c.bench_function("decide/consented_cross_border", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            black_box(decide(&policy, &env, &req(paths[i], bureau), &mut ()).reason)
        })
    });
    c.bench_function("decide/domestic_first_party", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            black_box(decide(&policy, &env, &req(paths[i], app), &mut ()).reason)
        })
    });
    c.bench_function("decide/refused_no_consent", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            black_box(decide(&policy, &env, &req("/ds1/u1/x.json", bureau), &mut ()).reason)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
