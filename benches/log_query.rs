//! `audit query`, `audit report` and `audit verify` throughput over a large log: generates a
//! signed log of `LOG_MB` MiB (default 1024) of realistic decision and outcome records once
//! (kept in the target dir for later runs), then streams it with each tool and prints
//! records per second.
//!
//! `cargo bench --bench log_query` (or `LOG_MB=256 cargo bench --bench log_query`).

#[path = "support/records.rs"]
mod records;

use residency_proxy::audit::keys::SigningKey;
use residency_proxy::audit::read::query::{self, Filter, Format};
use residency_proxy::audit::read::report;
use residency_proxy::audit::read::verify::{VerifyOptions, verify_with};
use residency_proxy::audit::record::Record;
use residency_proxy::audit::{LogWriter, Pseudonymizer};
use residency_proxy::policy::model::Durability;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

const TASKS: u64 = 16;

fn generate(path: &Path, key: Arc<SigningKey>, bytes: u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut s = records::settings(path, Durability::Write);
    s.rotate_bytes = u64::MAX;
    let pseudo = Arc::new(Pseudonymizer::new(&key.pseudonym_key()));
    let started = Instant::now();
    rt.block_on(async {
        let w = LogWriter::open(&s, Some(key)).unwrap();
        let base: jiff::Timestamp = "2026-11-28T00:00:00Z".parse().unwrap();
        let size = || std::fs::metadata(path).map_or(0, |m| m.len());
        let mut next = 0u64;
        while size() < bytes {
            // Rounds of 16 tasks x 1,000 exchanges, decision then outcome.
            let tasks: Vec<_> = (0..TASKS)
                .map(|t| {
                    let (w, pseudo) = (w.clone(), pseudo.clone());
                    let from = next + t * 1000;
                    tokio::spawn(async move {
                        for n in from..from + 1000 {
                            let ts = base + jiff::SignedDuration::from_millis(n as i64 * 10);
                            let d = records::decision(n, &pseudo, ts);
                            let o = records::outcome(&d, n);
                            w.append(Record::Decision(Box::new(d))).await.unwrap();
                            w.append(Record::Outcome(o)).await.unwrap();
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            next += TASKS * 1000;
        }
        w.close().await;
    });
    println!(
        "generated {} MiB in {:.1} s",
        std::fs::metadata(path).unwrap().len() >> 20,
        started.elapsed().as_secs_f64()
    );
}

/// Runs `f`, which returns the records it read and what it found, and prints its speed.
fn timed(name: &str, path: &Path, f: impl FnOnce() -> (u64, String)) {
    let bytes = std::fs::metadata(path).unwrap().len();
    let started = Instant::now();
    let (records, found) = f();
    let s = started.elapsed().as_secs_f64();
    println!(
        "{name:<52} {:>6.2} s {:>9.0} records/s {:>5.0} MiB/s  {found}",
        s,
        records as f64 / s,
        (bytes >> 20) as f64 / s
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let mib: u64 = std::env::var("LOG_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("log-query-bench");
    let path = dir.join("decisions.jsonl");
    let key_path = dir.join("log-signing.key");
    let have = std::fs::metadata(&path).map_or(0, |m| m.len());
    if have < mib << 20 || !key_path.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&key_path, SigningKey::generate_pem()).unwrap();
        let key = Arc::new(SigningKey::load(&key_path).unwrap());
        generate(&path, key, mib << 20);
    }
    let key = SigningKey::load(&key_path).unwrap();
    println!(
        "log: {} ({} MiB)",
        path.display(),
        std::fs::metadata(&path).unwrap().len() >> 20
    );

    let mut sink = std::io::sink();
    // The first pass would otherwise pay for reading the file from disk.
    timed("read only (cat > /dev/null)", &path, || {
        let mut f = std::fs::File::open(&path).unwrap();
        let n = std::io::copy(&mut f, &mut std::io::sink()).unwrap();
        (0, format!("{} MiB", n >> 20))
    });
    timed(
        "query, no filter (every decision record, JSON)",
        &path,
        || {
            let s = query::query(&path, &Filter::default(), Format::Json, None, &mut sink).unwrap();
            (s.records, format!("{} of {} records", s.matched, s.records))
        },
    );
    let selective = Filter {
        reasons: vec!["consent_missing".into()],
        countries: vec!["US".into()],
        ..Filter::default()
    };
    timed(
        "query --reason consent_missing --country US (JSON)",
        &path,
        || {
            let s = query::query(&path, &selective, Format::Json, None, &mut sink).unwrap();
            (s.records, format!("{} matched", s.matched))
        },
    );
    let pseudo = Pseudonymizer::new(&key.pseudonym_key());
    let subject = Filter {
        subjects: vec![pseudo.pseudonym("user-4242")],
        ..Filter::default()
    };
    timed("query --subject user-4242 (JSON)", &path, || {
        let s = query::query(&path, &subject, Format::Json, None, &mut sink).unwrap();
        (s.records, format!("{} matched", s.matched))
    });
    timed("query --decision deny --format table", &path, || {
        let f = Filter {
            decisions: vec!["deny".into()],
            ..Filter::default()
        };
        let s = query::query(&path, &f, Format::Table, None, &mut sink).unwrap();
        (s.records, format!("{} matched", s.matched))
    });
    timed("report", &path, || {
        let (r, s) = report::report(&path, None, None).unwrap();
        (s.records, format!("{} decisions counted", r.all.total))
    });
    timed("verify --key (chain and signatures)", &path, || {
        let opts = VerifyOptions {
            keys: vec![key.public_key().to_vec()],
            ..Default::default()
        };
        let r = verify_with(&path, &opts).unwrap();
        let found = format!("{} records, {} checkpoints", r.records, r.checkpoints);
        (r.records + r.checkpoints, found)
    });
}
