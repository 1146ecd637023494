//! The fuzz entry point for bulk records, shared by the fuzz target and a stable test: runs
//! arbitrary bytes through the streaming filter under several chunkings, limits, verdicts
//! and compressions, and checks the invariants that make the filter trustworthy. A
//! violated invariant panics (that is what a fuzzer reports); a well-behaved filter never
//! panics, whatever the input.

use super::BulkError;
use super::batch::{Batch, Counts, Reason, Verdict};
use super::codec::Encoder;
use super::drive::run_stream;
use super::spec::{Compression, Format, RecordsSpec};
use super::stream::{Limits, StreamFilter};
use bytes::Bytes;

/// What the reference run of [`fuzz_one`] produced.
#[derive(Debug)]
pub struct FuzzReport {
    /// The filtered object (uncompressed), or the error that ended it.
    pub output: Result<Vec<u8>, BulkError>,
    pub totals: Counts,
}

/// Small limits, so that short inputs cross batch and record limits.
const LIMITS: Limits = Limits {
    max_records: 5,
    max_bytes: 300,
    max_record_bytes: 120,
    zstd_window_log_max: 20,
};

/// Derives a spec, a compression and the object from raw fuzz bytes (the first byte picks
/// format, subject and compression), then runs [`fuzz_one`].
pub fn fuzz_bytes(data: &[u8]) {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let (format, subjects): (Format, &[&str]) = if sel & 1 == 0 {
        (Format::Jsonl, &["/id", "id", "/u/id", "/a/1", "/~1x~0"])
    } else {
        (Format::Csv, &["id", "name", "a b"])
    };
    let subject = subjects[(sel as usize >> 1) % subjects.len()];
    let compression = match (sel >> 4) % 3 {
        0 => Compression::Identity,
        1 => Compression::Gzip,
        _ => Compression::Zstd,
    };
    let spec = RecordsSpec::new(format, subject).expect("the fuzz subjects parse");
    fuzz_one(&spec, compression, input);
}

/// Runs `input`, an object's uncompressed bytes, through a streaming filter for `spec` and
/// checks, panicking on a violation:
///
/// - accounting: every input byte is in the header, a blank line, a kept or a dropped
///   record; records seen = kept + dropped, and the reasons add up;
/// - identity output is the header followed by exactly the kept records' bytes, in order;
/// - the same input cut into random chunks gives the same output and counts;
/// - keeping everything (audit mode, blank lines forwarded, no record over the limit)
///   reproduces the input byte for byte;
/// - compressed as `compression`, the filtered output decompresses to the same bytes, and
///   `input` fed as if it were compressed never panics (it is usually an error);
/// - the filter's buffer stays within its bound.
pub fn fuzz_one(spec: &RecordsSpec, compression: Compression, input: &[u8]) -> FuzzReport {
    if spec.format == Format::Parquet {
        return FuzzReport {
            output: Err(BulkError::NotStreamable {
                format: spec.format,
            }),
            totals: Counts::default(),
        };
    }
    let seed = input.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });

    // The reference run: identity, one chunk.
    let mut kept_bytes = Vec::new();
    let reference = run(
        spec,
        Compression::Identity,
        LIMITS,
        false,
        vec![Bytes::copy_from_slice(input)],
        |batch, out| {
            decide(batch, out);
            for (r, v) in batch.records().zip(out.iter()) {
                if !matches!(v, Verdict::Drop(_)) {
                    kept_bytes.extend_from_slice(r.bytes());
                }
            }
        },
    );
    let (output, totals) = reference.clone();
    let output = output.expect("an uncompressed object never fails");
    let t = &totals;
    assert_eq!(
        t.bytes_in,
        input.len() as u64,
        "every input byte is accounted for: {t:?}"
    );
    assert_eq!(
        t.bytes_in,
        t.header_bytes + t.blank_bytes + t.kept_bytes + t.dropped_bytes
    );
    assert_eq!(t.records, t.kept + t.dropped);
    assert_eq!(
        t.dropped_by_reason().map(|(_, n)| n).sum::<u64>(),
        t.dropped
    );
    assert_eq!(output.len() as u64, t.header_bytes + t.kept_bytes);
    assert_eq!(t.bytes_out, output.len() as u64);
    let header = t.header_bytes as usize;
    assert_eq!(
        &output[header..],
        &kept_bytes[..],
        "the output is the kept records, in order"
    );

    // Random chunks: same result.
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut chunks = Vec::new();
    let mut rest = input;
    while !rest.is_empty() {
        let most = if rng.bool() { 8 } else { 200 };
        let n = rng.usize(1..=rest.len().min(most));
        chunks.push(Bytes::copy_from_slice(&rest[..n]));
        rest = &rest[n..];
    }
    let chunked = run(
        spec,
        Compression::Identity,
        LIMITS,
        false,
        chunks.clone(),
        decide,
    );
    assert_eq!(chunked, reference, "chunking does not change the result");

    // Audit mode keeps everything: the input comes back whole.
    let audit_limits = Limits {
        max_record_bytes: input.len() + 1,
        ..LIMITS
    };
    let (audit, audit_totals) = run(
        spec,
        Compression::Identity,
        audit_limits,
        true,
        chunks.clone(),
        |batch, out| {
            out.extend(batch.records().map(|r| match r.subject() {
                Ok(_) => Verdict::Keep,
                Err(reason) => Verdict::KeepAudit(reason),
            }));
        },
    );
    assert_eq!(
        audit.as_deref(),
        Ok(input),
        "audit mode forwards the input byte for byte"
    );
    assert_eq!(audit_totals.dropped, 0);

    if compression != Compression::Identity {
        // The object compressed, in chunks: the same records kept, compressed again.
        let mut encoder = Encoder::new(compression).expect("an encoder");
        let mut packed = Vec::new();
        for c in &chunks {
            encoder
                .write(c, &mut packed)
                .expect("compressing in memory");
        }
        encoder.finish(&mut packed).expect("compressing in memory");
        let packed_chunks: Vec<Bytes> = packed
            .chunks(rng.usize(1..=64))
            .map(Bytes::copy_from_slice)
            .collect();
        let (out, _) = run(spec, compression, LIMITS, false, packed_chunks, decide);
        let out = out.expect("a well-formed compressed object filters");
        assert_eq!(
            decompress(compression, &out),
            output,
            "compression round trip"
        );

        // The raw bytes as if they were compressed: any result but a panic.
        let _ = run(spec, compression, LIMITS, false, chunks, decide);
    }
    FuzzReport {
        output: Ok(output),
        totals,
    }
}

/// The fuzz verdict: keep a record when the bytes of its subject add up to an even number,
/// drop it otherwise, and keep every seventh record flagged as an audit-mode would-drop.
fn decide(batch: Batch<'_>, out: &mut Vec<Verdict>) {
    out.extend(batch.records().enumerate().map(|(i, r)| match r.subject() {
        _ if i % 7 == 6 => Verdict::KeepAudit(Reason(9)),
        Ok(s) if s.bytes().map(u32::from).sum::<u32>() % 2 == 0 => Verdict::Keep,
        Ok(_) => Verdict::Drop(Reason(Reason::FIRST_CALLER)),
        Err(reason) => Verdict::Drop(reason),
    }));
}

/// One run; the output, or the error that ended it, and the totals.
fn run(
    spec: &RecordsSpec,
    compression: Compression,
    limits: Limits,
    forward_blank: bool,
    chunks: Vec<Bytes>,
    mut decide: impl FnMut(Batch<'_>, &mut Vec<Verdict>),
) -> (Result<Vec<u8>, BulkError>, Counts) {
    let mut filter = StreamFilter::new(spec, compression, limits)
        .expect("a stream filter for a stream format")
        .forward_blank_lines(forward_blank);
    let bound = 4 * (limits.max_bytes + limits.max_record_bytes + 64 * 1024);
    let mut out = Vec::new();
    let result = run_stream(
        &mut filter,
        chunks,
        |b, v| {
            decide(b, v);
        },
        |e| out.extend_from_slice(&e.bytes),
    );
    assert!(
        filter.buffer_capacity() <= bound,
        "the buffer grew to {} bytes",
        filter.buffer_capacity()
    );
    (result.map(|()| out), filter.totals().clone())
}

fn decompress(compression: Compression, data: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    match compression {
        Compression::Identity => out.extend_from_slice(data),
        Compression::Gzip => {
            flate2::read::MultiGzDecoder::new(data)
                .read_to_end(&mut out)
                .expect("the filter's gzip output decompresses");
        }
        Compression::Zstd => {
            zstd::stream::read::Decoder::new(data)
                .and_then(|mut d| d.read_to_end(&mut out))
                .expect("the filter's zstd output decompresses");
        }
    }
    out
}
