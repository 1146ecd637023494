//! The cost of appending a record to the decision log, in `write` and `fsync` durability:
//! one request at a time (each record its own batch: the latency a request pays), and 64
//! concurrent requests (group commit: records share a write, and an fsync). Checkpoints are
//! signed every 1,000 records as by default, so their cost is included. Prints how many
//! records shared one fsync.
//!
//! `cargo bench --bench log`; the log lives in a temp dir on the same file system as the
//! build, rotated every 32 MiB with old files deleted, so the disk use stays small.

#[path = "support/records.rs"]
mod records;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use residency_proxy::audit::files::rotated_siblings;
use residency_proxy::audit::keys::SigningKey;
use residency_proxy::audit::{LogWriter, Pseudonymizer, Record};
use residency_proxy::policy::model::Durability;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CONCURRENCY: u64 = 64;

fn pool() -> Vec<Record> {
    let pseudo = Pseudonymizer::new(&[7; 32]);
    let ts = jiff::Timestamp::now();
    (0..256)
        .map(|n| Record::Decision(Box::new(records::decision(n, &pseudo, ts))))
        .collect()
}

fn open(path: &Path, durability: Durability) -> LogWriter {
    let mut s = records::settings(path, durability);
    s.rotate_bytes = 32 << 20;
    let key = SigningKey::from_pem(SigningKey::generate_pem().as_bytes(), "k".as_ref()).unwrap();
    LogWriter::open(&s, Some(Arc::new(key))).unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let records = Arc::new(pool());
    let mut g = c.benchmark_group("log_append");
    g.measurement_time(Duration::from_secs(4))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1));

    g.bench_function("clone_only_baseline", |b| {
        b.iter(|| records[0].clone());
    });

    for (name, durability) in [("write", Durability::Write), ("fsync", Durability::Fsync)] {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let path = dir.path().join("decisions.jsonl");
        // Opened on the runtime, as the proxy does: in `write` mode the committer is one of
        // its tasks.
        let w = rt.block_on(async { open(&path, durability) });
        let cleanup = |path: &Path| {
            for f in rotated_siblings(path).unwrap() {
                let _ = std::fs::remove_file(f);
            }
        };
        g.bench_with_input(BenchmarkId::new(name, "sequential"), &(), |b, ()| {
            b.iter_custom(|iters| {
                let (w, records) = (w.clone(), records.clone());
                let took = rt.block_on(async move {
                    let start = Instant::now();
                    for i in 0..iters {
                        w.append(records[i as usize % records.len()].clone())
                            .await
                            .unwrap();
                    }
                    start.elapsed()
                });
                cleanup(&path);
                took
            });
        });
        let before = w.stats();
        g.bench_with_input(BenchmarkId::new(name, "concurrent_64"), &(), |b, ()| {
            b.iter_custom(|iters| {
                let per_task = iters.div_ceil(CONCURRENCY);
                let (w, records) = (w.clone(), records.clone());
                let took = rt.block_on(async move {
                    let start = Instant::now();
                    let tasks: Vec<_> = (0..CONCURRENCY)
                        .map(|t| {
                            let (w, records) = (w.clone(), records.clone());
                            tokio::spawn(async move {
                                for i in 0..per_task {
                                    let r = records[((t * per_task + i) as usize) % records.len()]
                                        .clone();
                                    w.append(r).await.unwrap();
                                }
                            })
                        })
                        .collect();
                    for t in tasks {
                        t.await.unwrap();
                    }
                    // Scaled to the iterations asked for.
                    start
                        .elapsed()
                        .mul_f64(iters as f64 / (per_task * CONCURRENCY) as f64)
                });
                cleanup(&path);
                took
            });
        });
        let after = w.stats();
        let (records_n, batches, syncs) = (
            after.written - before.written,
            after.batches - before.batches,
            after.syncs - before.syncs,
        );
        eprintln!(
            "log_append/{name}/concurrent_64: {records_n} records in {batches} writes ({:.1} records per write){}",
            records_n as f64 / batches.max(1) as f64,
            if syncs > 0 {
                format!(
                    ", {syncs} fsyncs ({:.1} records per fsync)",
                    records_n as f64 / syncs as f64
                )
            } else {
                String::new()
            }
        );
        rt.block_on(w.close());
        cleanup(&path);
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
