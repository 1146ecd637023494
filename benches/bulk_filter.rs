//! Throughput of the bulk record filter alone (no network, no consent lookups): 500,000
//! spending records shaped like the bulk benchmark's, subjects drawn from 1,000,000, half
//! of the subjects kept: JSON lines (about 180 bytes a record, 87 MiB) and CSV (about 80
//! bytes a row, 40 MiB), uncompressed, gzip and zstd. Throughput is counted in uncompressed
//! object bytes per second of the benchmark thread's CPU time (on Linux; wall time
//! elsewhere): the machine is shared, and CPU time measures the filter on one core rather
//! than its neighbours.

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use residency_proxy::bulk::{
    Batch, Compression, Format, Limits, RecordsSpec, StreamFilter, Verdict, run_stream,
};
use std::hint::black_box;
use std::io::Write;
use std::time::{Duration, Instant};

const RECORDS: usize = 500_000;
const SUBJECTS: u64 = 1_000_000;
/// The size of the chunks the upstream body arrives in.
const CHUNK: usize = 64 * 1024;

const MERCHANTS: [&str; 6] = [
    "Hema Fresh Pudong",
    "Meituan Waimai",
    "Didi Chuxing",
    "JD.com, Self-operated",
    "Starbucks Reserve Roastery",
    "Luckin Coffee #1402",
];
const CATEGORIES: [&str; 6] = [
    "groceries",
    "food_delivery",
    "transport",
    "electronics",
    "coffee",
    "coffee",
];

fn records(format: Format) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(2026);
    let mut out = Vec::with_capacity(RECORDS * 210);
    if format == Format::Csv {
        out.extend_from_slice(
            b"user_id,ts,merchant,amount_cents,currency,category,card_last4,city\n",
        );
    }
    for i in 0..RECORDS {
        let subject = rng.u64(0..SUBJECTS);
        let m = rng.usize(0..MERCHANTS.len());
        let (min, sec) = (i / 60 % 60, i % 60);
        let amount = rng.u32(100..500_000);
        let card = rng.u32(1000..10_000);
        match format {
            Format::Jsonl => writeln!(
                out,
                "{{\"user_id\":\"u{subject:07}\",\"ts\":\"2026-11-03T10:{min:02}:{sec:02}Z\",\"merchant\":\"{}\",\"amount_cents\":{amount},\"currency\":\"CNY\",\"category\":\"{}\",\"card_last4\":\"{card}\",\"city\":\"Shanghai\"}}",
                MERCHANTS[m], CATEGORIES[m]
            ),
            // Quoted only when needed, as most writers do.
            _ => {
                let merchant = MERCHANTS[m];
                let quote = if merchant.contains(',') { "\"" } else { "" };
                writeln!(
                    out,
                    "u{subject:07},2026-11-03T10:{min:02}:{sec:02}Z,{quote}{merchant}{quote},{amount},CNY,{},{card},Shanghai",
                    CATEGORIES[m]
                )
            }
        }
        .unwrap();
    }
    out
}

fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
    match c {
        Compression::Identity => data.to_vec(),
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(data, 3).unwrap(),
    }
}

/// Keeps every other subject (those whose last digit is even), as a consent cache would
/// answer per distinct subject.
fn decide(batch: Batch<'_>, out: &mut Vec<Verdict>) {
    let per_subject: Vec<Verdict> = batch
        .distinct()
        .map(|s| {
            if s.as_bytes().last().is_some_and(|d| d % 2 == 0) {
                Verdict::Keep
            } else {
                Verdict::Drop(residency_proxy::bulk::Reason(2))
            }
        })
        .collect();
    batch.verdicts_by_subject(&per_subject, false, out);
}

fn filter(spec: &RecordsSpec, c: Compression, chunks: &[Bytes]) -> u64 {
    let mut f = StreamFilter::new(spec, c, Limits::default()).unwrap();
    let mut out = 0u64;
    run_stream(&mut f, chunks.iter().cloned(), decide, |e| {
        out += black_box(e.bytes).len() as u64
    })
    .unwrap();
    assert!(f.totals().kept > 0 && f.totals().dropped > 0);
    out
}

/// CPU time of this thread so far (utime + stime, in 10 ms clock ticks), if the system
/// says.
fn thread_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

fn bench(c: &mut Criterion) {
    for (format, subject) in [(Format::Jsonl, "/user_id"), (Format::Csv, "user_id")] {
        let data = records(format);
        let spec = RecordsSpec::new(format, subject).unwrap();
        let mut group = c.benchmark_group(format!("bulk_filter/{format}"));
        group.throughput(Throughput::Bytes(data.len() as u64));
        group.sample_size(10);
        group.warm_up_time(Duration::from_secs(1));
        group.measurement_time(Duration::from_secs(8));
        for compression in [Compression::Identity, Compression::Gzip, Compression::Zstd] {
            let packed = compress(compression, &data);
            let chunks: Vec<Bytes> = packed.chunks(CHUNK).map(Bytes::copy_from_slice).collect();
            let name = compression.content_encoding().unwrap_or("identity");
            group.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    let (cpu, wall) = (thread_cpu(), Instant::now());
                    for _ in 0..iters {
                        black_box(filter(&spec, compression, &chunks));
                    }
                    match (cpu, thread_cpu()) {
                        (Some(start), Some(end)) => end - start,
                        _ => wall.elapsed(),
                    }
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
