//! The streaming filter end to end: JSON lines and CSV, chunking, limits, compression,
//! audit mode, and the fuzz entry point over a fixed corpus.

use super::*;
use std::io::{Read, Write};

fn spec(format: Format, subject: &str) -> RecordsSpec {
    RecordsSpec::new(format, subject).unwrap()
}

/// Keeps the records whose subject is in `consented`; drops the rest for their own reason,
/// or `Reason(7)` for a subject without consent.
fn by_consent<'a>(consented: &'a [&'a str]) -> impl FnMut(Batch<'_>, &mut Vec<Verdict>) + 'a {
    move |batch, out| {
        out.extend(batch.records().map(|r| match r.subject() {
            Ok(s) if consented.contains(&s) => Verdict::Keep,
            Ok(_) => Verdict::Drop(Reason(7)),
            Err(reason) => Verdict::Drop(reason),
        }))
    }
}

/// Runs `chunks` through a filter; the output (decompressed) and the totals.
fn filter_chunks(
    spec: &RecordsSpec,
    compression: Compression,
    limits: Limits,
    chunks: Vec<Bytes>,
    decide: impl FnMut(Batch<'_>, &mut Vec<Verdict>),
) -> (Vec<u8>, Counts) {
    let mut f = StreamFilter::new(spec, compression, limits).unwrap();
    let mut out = Vec::new();
    run_stream(&mut f, chunks, decide, |e| out.extend_from_slice(&e.bytes)).unwrap();
    (decompress(compression, &out), f.totals().clone())
}

fn filter(
    spec: &RecordsSpec,
    input: &[u8],
    decide: impl FnMut(Batch<'_>, &mut Vec<Verdict>),
) -> (Vec<u8>, Counts) {
    filter_chunks(
        spec,
        Compression::Identity,
        Limits::default(),
        vec![Bytes::copy_from_slice(input)],
        decide,
    )
}

fn decompress(compression: Compression, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match compression {
        Compression::Identity => out.extend_from_slice(data),
        Compression::Gzip => {
            flate2::read::MultiGzDecoder::new(data)
                .read_to_end(&mut out)
                .unwrap();
        }
        Compression::Zstd => {
            zstd::stream::read::Decoder::new(data)
                .unwrap()
                .read_to_end(&mut out)
                .unwrap();
        }
    }
    out
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

use bytes::Bytes;

const JSONL: &str = concat!(
    "{\"user_id\":\"alice\",\"amount\":1}\n",
    "{\"user_id\":\"bob\",\"amount\":2}\r\n",
    "   \n",
    "{\"amount\":3}\n",
    "not json\n",
    "{\"user_id\":\"alice\",\"amount\":4,\"tags\":[\"x\",{\"y\":null}]}\n",
    "\n",
    "{\"user_id\":42,\"amount\":5}\n",
    "{\"user_id\":\"carol\",\"amount\":6}",
);

#[test]
fn jsonl_keeps_consented_records_byte_for_byte_in_order() {
    let (out, t) = filter(
        &spec(Format::Jsonl, "user_id"),
        JSONL.as_bytes(),
        by_consent(&["alice", "42", "carol"]),
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        concat!(
            "{\"user_id\":\"alice\",\"amount\":1}\n",
            "{\"user_id\":\"alice\",\"amount\":4,\"tags\":[\"x\",{\"y\":null}]}\n",
            "{\"user_id\":42,\"amount\":5}\n",
            "{\"user_id\":\"carol\",\"amount\":6}",
        )
    );
    assert_eq!((t.records, t.kept, t.dropped), (7, 4, 3));
    assert_eq!(t.dropped_for(Reason(7)), 1); // bob
    assert_eq!(t.dropped_for(Reason::NO_SUBJECT), 1);
    assert_eq!(t.dropped_for(Reason::UNPARSABLE), 1);
    assert_eq!(t.blank_bytes, 5);
    assert_eq!(t.bytes_in, JSONL.len() as u64);
    assert_eq!(t.bytes_out, t.kept_bytes);
}

#[test]
fn batches_show_subjects_and_distinct_subjects() {
    let s = spec(Format::Jsonl, "/user_id");
    let mut f = StreamFilter::new(
        &s,
        Compression::Identity,
        Limits {
            max_records: 4,
            ..Limits::default()
        },
    )
    .unwrap();
    f.push(Bytes::from_static(JSONL.as_bytes()));
    f.finish();
    let batch = f.next_batch().unwrap().unwrap();
    assert_eq!(batch.len(), 4);
    let subjects: Vec<_> = batch.records().map(|r| r.subject()).collect();
    assert_eq!(
        subjects,
        [
            Ok("alice"),
            Ok("bob"),
            Err(Reason::NO_SUBJECT),
            Err(Reason::UNPARSABLE)
        ]
    );
    assert_eq!(batch.distinct_subjects(), ["alice", "bob"]);
    assert_eq!(batch.record(1).subject_id(), Some(1));
    assert_eq!(
        batch.record(1).bytes(),
        b"{\"user_id\":\"bob\",\"amount\":2}\r\n"
    );
    // Verdicts per distinct subject: records without one are dropped for their reason...
    let mut v = Vec::new();
    batch.verdicts_by_subject(&[Verdict::Keep, Verdict::Drop(Reason(5))], false, &mut v);
    assert_eq!(
        v,
        [
            Verdict::Keep,
            Verdict::Drop(Reason(5)),
            Verdict::Drop(Reason::NO_SUBJECT),
            Verdict::Drop(Reason::UNPARSABLE)
        ]
    );
    // ...or, in audit mode, kept and counted as would-drops.
    batch.verdicts_by_subject(&[Verdict::Keep, Verdict::Drop(Reason(5))], true, &mut v);
    assert_eq!(
        v,
        [
            Verdict::Keep,
            Verdict::KeepAudit(Reason(5)),
            Verdict::KeepAudit(Reason::NO_SUBJECT),
            Verdict::KeepAudit(Reason::UNPARSABLE)
        ]
    );
    // Asked again before emitting, the same batch.
    assert_eq!(f.next_batch().unwrap().unwrap().len(), 4);
    assert!(matches!(
        f.emit(&v[..3]),
        Err(BulkError::VerdictCount {
            expected: 4,
            got: 3
        })
    ));
    let e = f.emit(&v).unwrap();
    assert_eq!(e.counts.would_drop_for(Reason::UNPARSABLE), 1);
    assert_eq!(e.counts.kept, 4);
    let batch = f.next_batch().unwrap().unwrap();
    assert_eq!(batch.distinct_subjects(), ["alice", "42", "carol"]);
    assert!(f.next_batch().is_ok());
}

/// Every split into two chunks, and many into three.
#[test]
fn every_split_point_gives_the_same_output() {
    for (format, subject, input) in [
        (Format::Jsonl, "user_id", JSONL.to_string()),
        (Format::Csv, "id", CSV.to_string()),
    ] {
        let s = spec(format, subject);
        let limits = Limits {
            max_records: 2,
            max_bytes: 64,
            max_record_bytes: 60,
            ..Limits::default()
        };
        let whole = filter_chunks(
            &s,
            Compression::Identity,
            limits,
            vec![Bytes::from(input.clone())],
            by_consent(&["alice", "42", "7"]),
        );
        assert!(whole.1.kept > 0 && whole.1.dropped > 0);
        for i in 0..=input.len() {
            for j in (i..=input.len()).step_by(5) {
                let chunks = vec![
                    Bytes::copy_from_slice(&input.as_bytes()[..i]),
                    Bytes::copy_from_slice(&input.as_bytes()[i..j]),
                    Bytes::copy_from_slice(&input.as_bytes()[j..]),
                ];
                let got = filter_chunks(
                    &s,
                    Compression::Identity,
                    limits,
                    chunks,
                    by_consent(&["alice", "42", "7"]),
                );
                assert_eq!(got, whole, "{format} split at {i} and {j}");
            }
        }
    }
}

#[test]
fn random_chunks_compressed_or_not_give_the_same_records() {
    let mut rng = fastrand::Rng::with_seed(20);
    let mut input = String::new();
    for i in 0..3000 {
        if i % 97 == 0 {
            input.push_str("{broken\n");
        }
        input.push_str(&format!(
            "{{\"user\":{{\"id\":\"u{}\"}},\"n\":{i},\"pad\":\"{}\"}}\n",
            i % 50,
            "x".repeat(i % 300)
        ));
    }
    let s = spec(Format::Jsonl, "/user/id");
    let consented: Vec<String> = (0..50)
        .filter(|i| i % 3 == 0)
        .map(|i| format!("u{i}"))
        .collect();
    let consented: Vec<&str> = consented.iter().map(String::as_str).collect();
    let limits = Limits {
        max_records: 100,
        max_bytes: 16 * 1024,
        ..Limits::default()
    };
    let (want, want_t) = filter_chunks(
        &s,
        Compression::Identity,
        limits,
        vec![Bytes::from(input.clone())],
        by_consent(&consented),
    );
    assert_eq!(want_t.dropped_for(Reason::UNPARSABLE), 31);
    for compression in [Compression::Identity, Compression::Gzip, Compression::Zstd] {
        let packed = match compression {
            Compression::Identity => input.clone().into_bytes(),
            Compression::Gzip => gzip(input.as_bytes()),
            Compression::Zstd => zstd::encode_all(input.as_bytes(), 3).unwrap(),
        };
        for _ in 0..5 {
            let mut chunks = Vec::new();
            let mut rest = &packed[..];
            while !rest.is_empty() {
                let n = rng.usize(1..=rest.len().min(20_000));
                chunks.push(Bytes::copy_from_slice(&rest[..n]));
                rest = &rest[n..];
            }
            let (got, t) = filter_chunks(&s, compression, limits, chunks, by_consent(&consented));
            assert!(got == want, "{compression:?}");
            assert_eq!(
                (t.kept, t.dropped, t.kept_bytes),
                (want_t.kept, want_t.dropped, want_t.kept_bytes)
            );
            assert_eq!(t.bytes_in_raw, packed.len() as u64);
        }
    }
}

#[test]
fn multi_member_gzip_is_filtered_and_recompressed() {
    let mut packed = gzip(b"{\"id\":\"a\",\"n\":1}\n{\"id\":\"b\",\"n\":2}\n{\"id\":\"a\"");
    packed.extend(gzip(b",\"n\":3}\n{\"id\":\"b\",\"n\":4}\n"));
    let s = spec(Format::Jsonl, "id");
    let chunks: Vec<Bytes> = packed.chunks(5).map(Bytes::copy_from_slice).collect();
    let mut f = StreamFilter::new(&s, Compression::Gzip, Limits::default()).unwrap();
    let mut raw = Vec::new();
    run_stream(&mut f, chunks, by_consent(&["a"]), |e| {
        raw.extend_from_slice(&e.bytes)
    })
    .unwrap();
    // One gzip member out, with a trailer that checks.
    let mut d = flate2::read::GzDecoder::new(&raw[..]);
    let mut out = String::new();
    d.read_to_string(&mut out).unwrap();
    assert_eq!(out, "{\"id\":\"a\",\"n\":1}\n{\"id\":\"a\",\"n\":3}\n");
}

#[test]
fn each_batch_is_readable_by_the_client_when_it_is_sent() {
    let input: String = (0..200)
        .map(|i| format!("{{\"id\":\"s{}\"}}\n", i % 4))
        .collect();
    for compression in [Compression::Gzip, Compression::Zstd] {
        let packed = match compression {
            Compression::Gzip => gzip(input.as_bytes()),
            _ => zstd::encode_all(input.as_bytes(), 1).unwrap(),
        };
        let s = spec(Format::Jsonl, "id");
        let mut f = StreamFilter::new(
            &s,
            compression,
            Limits {
                max_records: 10,
                ..Limits::default()
            },
        )
        .unwrap();
        f.push(Bytes::from(packed));
        f.finish();
        let mut sent = Vec::new();
        let mut kept = 0;
        let mut v = Vec::new();
        while let Some(b) = f.next_batch().unwrap() {
            v.clear();
            by_consent(&["s1"])(b, &mut v);
            let e = f.emit(&v).unwrap();
            kept += e.counts.kept;
            sent.extend_from_slice(&e.bytes);
            // What was sent so far decompresses to every record kept so far.
            let mut got = Vec::new();
            match compression {
                Compression::Gzip => {
                    let _ = flate2::read::GzDecoder::new(&sent[..]).read_to_end(&mut got);
                }
                _ => {
                    let _ = zstd::stream::read::Decoder::new(&sent[..])
                        .unwrap()
                        .read_to_end(&mut got);
                }
            }
            assert_eq!(
                got.len() as u64,
                kept * "{\"id\":\"s1\"}\n".len() as u64,
                "{compression:?}"
            );
        }
        sent.extend_from_slice(&f.close().unwrap().bytes);
        assert_eq!(decompress(compression, &sent).len(), 50 * 12);
    }
}

#[test]
fn corrupt_stream_ends_with_an_error_after_the_good_batches() {
    let input: String = (0..100).map(|i| format!("{{\"id\":\"s{i}\"}}\n")).collect();
    let mut packed = gzip(input.as_bytes());
    let n = packed.len();
    packed[n / 2] ^= 0xff;
    packed[n / 2 + 1] ^= 0x55;
    let s = spec(Format::Jsonl, "id");
    let mut f = StreamFilter::new(
        &s,
        Compression::Gzip,
        Limits {
            max_records: 5,
            ..Limits::default()
        },
    )
    .unwrap();
    let mut out = Vec::new();
    let err = run_stream(
        &mut f,
        packed
            .chunks(7)
            .map(Bytes::copy_from_slice)
            .collect::<Vec<_>>(),
        |b, v| v.extend((0..b.len()).map(|_| Verdict::Keep)),
        |e| out.extend_from_slice(&e.bytes),
    )
    .unwrap_err();
    assert!(
        matches!(err, BulkError::Corrupt { codec: "gzip", .. }),
        "{err}"
    );
    // Later calls report the same error.
    assert_eq!(f.next_batch().unwrap_err(), err);
    // Truncated at the end: an error too.
    let packed = zstd::encode_all(input.as_bytes(), 1).unwrap();
    let mut f = StreamFilter::new(&s, Compression::Zstd, Limits::default()).unwrap();
    let err = run_stream(
        &mut f,
        [Bytes::copy_from_slice(&packed[..packed.len() - 1])],
        |b, v| v.extend((0..b.len()).map(|_| Verdict::Keep)),
        |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(err, BulkError::Truncated { codec: "zstd", .. }),
        "{err}"
    );
}

#[test]
fn a_line_over_the_limit_is_dropped_without_being_buffered() {
    let s = spec(Format::Jsonl, "id");
    let limits = Limits {
        max_record_bytes: 64 * 1024,
        ..Limits::default()
    };
    let mut f = StreamFilter::new(&s, Compression::Identity, limits).unwrap();
    let mut out = Vec::new();
    let mut v = Vec::new();
    let mut drain = |f: &mut StreamFilter, out: &mut Vec<u8>| {
        while let Some(b) = f.next_batch().unwrap() {
            v.clear();
            v.extend((0..b.len()).map(|_| Verdict::Keep));
            out.extend_from_slice(&f.emit(&v).unwrap().bytes);
        }
    };
    f.push(Bytes::from_static(
        b"{\"id\":\"a\"}\n{\"id\":\"b\",\"huge\":\"",
    ));
    drain(&mut f, &mut out);
    // 64 MiB of one line, in 1 MiB chunks: the buffer stays small.
    let chunk = Bytes::from(vec![b'x'; 1 << 20]);
    for _ in 0..64 {
        f.push(chunk.clone());
        drain(&mut f, &mut out);
        assert!(
            f.buffer_capacity() < 4 << 20,
            "buffer grew to {}",
            f.buffer_capacity()
        );
    }
    f.push(Bytes::from_static(b"\"}\n{\"id\":\"c\"}\n"));
    f.finish();
    drain(&mut f, &mut out);
    out.extend_from_slice(&f.close().unwrap().bytes);
    assert_eq!(out, b"{\"id\":\"a\"}\n{\"id\":\"c\"}\n");
    let t = f.totals();
    assert_eq!(
        (t.records, t.kept, t.dropped_for(Reason::UNPARSABLE)),
        (3, 2, 1)
    );
    assert_eq!(t.dropped_bytes, 64 * (1 << 20) + 21);
    assert!(f.buffer_capacity() < 4 << 20);
}

#[test]
fn blank_lines_alone_never_fill_memory() {
    // 8 MiB of blank lines and then one record, with 64 KiB batches: empty batches pass them.
    let s = spec(Format::Jsonl, "id");
    let limits = Limits {
        max_bytes: 64 * 1024,
        ..Limits::default()
    };
    let mut f = StreamFilter::new(&s, Compression::Identity, limits)
        .unwrap()
        .forward_blank_lines(true);
    let mut out = Vec::new();
    let mut empty_batches = 0;
    let blank = Bytes::from(b"  \n".repeat(1 << 16));
    let mut chunks: Vec<Bytes> = (0..43).map(|_| blank.clone()).collect();
    chunks.push(Bytes::from_static(b"{\"id\":\"a\"}\n"));
    run_stream(
        &mut f,
        chunks,
        |b, v| {
            empty_batches += b.is_empty() as u32;
            v.extend((0..b.len()).map(|_| Verdict::Keep));
        },
        |e| out.extend_from_slice(&e.bytes),
    )
    .unwrap();
    assert!(empty_batches > 10);
    assert!(f.buffer_capacity() < 1 << 20);
    assert_eq!(out.len(), 43 * 3 * (1 << 16) + 11);
    assert_eq!(f.totals().kept, 1);
}

const CSV: &str = concat!(
    "name,id,note\r\n",
    "Alice,alice,\"says \"\"hi\"\", twice\"\r\n",
    "Bob,bob,plain\r\n",
    "\"Multi\nLine\",7,\"a\r\nb\"\r\n",
    "Short,42\r\n",
    "Bad\"quote,42,x\r\n",
    "\r\n",
    "Empty,,x\r\n",
    "Quoted,\"42\",x\r\n",
    "\"Esc\",\"al\"\"ice\",y\r\n",
);

#[test]
fn csv_keeps_header_and_consented_rows_byte_for_byte() {
    let (out, t) = filter(
        &spec(Format::Csv, "id"),
        CSV.as_bytes(),
        by_consent(&["alice", "7", "42", "al\"ice"]),
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        concat!(
            "name,id,note\r\n",
            "Alice,alice,\"says \"\"hi\"\", twice\"\r\n",
            "\"Multi\nLine\",7,\"a\r\nb\"\r\n",
            "Quoted,\"42\",x\r\n",
            "\"Esc\",\"al\"\"ice\",y\r\n",
        )
    );
    // Short (3 fields expected), Bad"quote: unparsable; Empty: no subject; Bob: no consent.
    assert_eq!(t.dropped_for(Reason::UNPARSABLE), 2);
    assert_eq!(t.dropped_for(Reason::NO_SUBJECT), 1);
    assert_eq!(t.dropped_for(Reason(7)), 1);
    assert_eq!((t.records, t.kept), (8, 4));
    assert_eq!(t.header_bytes, 14);
    assert_eq!(t.blank_bytes, 2);
}

#[test]
fn csv_header_is_sent_even_when_nothing_is_kept() {
    let s = spec(Format::Csv, "id");
    let (out, t) = filter(&s, b"id,x\nbob,1\ncarol,2\n", by_consent(&[]));
    assert_eq!(out, b"id,x\n");
    assert_eq!(t.dropped, 2);
    // A header alone, without a newline.
    let (out, _) = filter(&s, b"id,x", by_consent(&[]));
    assert_eq!(out, b"id,x");
    // With gzip: a valid stream holding the header.
    let (out, _) = filter_chunks(
        &s,
        Compression::Gzip,
        Limits::default(),
        vec![Bytes::from(gzip(b"id,x\nbob,1\n"))],
        by_consent(&[]),
    );
    assert_eq!(out, b"id,x\n");
    // Nothing at all.
    let (out, t) = filter(&s, b"", by_consent(&[]));
    assert_eq!((out.len(), t.records), (0, 0));
}

#[test]
fn csv_without_the_column_drops_every_row_as_no_subject() {
    for header in ["name,x\n", "id,name,id\n"] {
        let input = format!("{header}a,b\nc,d\n");
        let (out, t) = filter(&spec(Format::Csv, "id"), input.as_bytes(), |b, v| {
            v.extend(b.records().map(|r| match r.subject() {
                Ok(_) => Verdict::Keep,
                Err(reason) => Verdict::Drop(reason),
            }))
        });
        assert_eq!(out, header.as_bytes());
        assert_eq!(
            t.dropped_for(Reason::NO_SUBJECT) + t.dropped_for(Reason::UNPARSABLE),
            2,
            "{header}"
        );
    }
}

#[test]
fn csv_unterminated_quote_at_the_end_is_unparsable() {
    let (out, t) = filter(
        &spec(Format::Csv, "id"),
        b"id,x\na,1\nb,\"open\nstill open",
        by_consent(&["a", "b"]),
    );
    assert_eq!(out, b"id,x\na,1\n");
    assert_eq!(t.dropped_for(Reason::UNPARSABLE), 1);
}

#[test]
fn csv_byte_order_mark_on_the_header() {
    let (out, t) = filter(
        &spec(Format::Csv, "id"),
        b"\xEF\xBB\xBFid,x\na,1\n",
        by_consent(&["a"]),
    );
    assert_eq!(out, b"\xEF\xBB\xBFid,x\na,1\n");
    assert_eq!(t.kept, 1);
    let (out, _) = filter(
        &spec(Format::Jsonl, "id"),
        b"\xEF\xBB\xBF{\"id\":\"a\"}\n",
        by_consent(&["a"]),
    );
    assert_eq!(out, b"\xEF\xBB\xBF{\"id\":\"a\"}\n");
}

#[test]
fn csv_row_over_the_limit_is_skipped_with_its_quoted_newlines() {
    let mut input = b"id,x\na,1\nb,\"".to_vec();
    input.extend(b"line\n".repeat(10_000));
    input.extend(b"\"\nc,2\n");
    let limits = Limits {
        max_record_bytes: 1000,
        ..Limits::default()
    };
    let chunks: Vec<Bytes> = input.chunks(333).map(Bytes::copy_from_slice).collect();
    let (out, t) = filter_chunks(
        &spec(Format::Csv, "id"),
        Compression::Identity,
        limits,
        chunks,
        by_consent(&["a", "b", "c"]),
    );
    assert_eq!(out, b"id,x\na,1\nc,2\n");
    assert_eq!(t.dropped_for(Reason::UNPARSABLE), 1);
}

#[test]
fn audit_mode_forwards_everything_and_counts_would_drops() {
    for (format, subject, input) in [(Format::Jsonl, "user_id", JSONL), (Format::Csv, "id", CSV)] {
        let s = spec(format, subject);
        let mut f = StreamFilter::new(
            &s,
            Compression::Identity,
            Limits {
                max_records: 3,
                ..Limits::default()
            },
        )
        .unwrap()
        .forward_blank_lines(true);
        let mut out = Vec::new();
        let chunks = input
            .as_bytes()
            .chunks(3)
            .map(Bytes::copy_from_slice)
            .collect::<Vec<_>>();
        run_stream(
            &mut f,
            chunks,
            |b, v| {
                let per_subject: Vec<Verdict> = b
                    .distinct()
                    .map(|s| {
                        if s == "alice" {
                            Verdict::Keep
                        } else {
                            Verdict::Drop(Reason(7))
                        }
                    })
                    .collect();
                b.verdicts_by_subject(&per_subject, true, v);
            },
            |e| out.extend_from_slice(&e.bytes),
        )
        .unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), input, "{format}");
        let t = f.totals();
        assert_eq!(t.dropped, 0);
        assert_eq!(t.kept, t.records);
        assert!(t.would_drop_for(Reason(7)) > 0 && t.would_drop_for(Reason::UNPARSABLE) > 0);
    }
}

#[test]
fn next_batch_now_cuts_what_has_arrived() {
    let s = spec(Format::Jsonl, "id");
    let mut f = StreamFilter::new(&s, Compression::Identity, Limits::default()).unwrap();
    f.push(Bytes::from_static(
        b"{\"id\":\"a\"}\n{\"id\":\"b\"}\n{\"id\"",
    ));
    assert!(f.next_batch().unwrap().is_none());
    assert!(f.wants_input());
    assert_eq!(f.next_batch_now().unwrap().unwrap().len(), 2);
    let e = f.emit(&[Verdict::Keep, Verdict::Drop(Reason(3))]).unwrap();
    assert_eq!(&e.bytes[..], b"{\"id\":\"a\"}\n");
    assert!(f.next_batch_now().unwrap().is_none());
    f.push(Bytes::from_static(b":\"c\"}"));
    f.finish();
    assert_eq!(f.next_batch().unwrap().unwrap().len(), 1);
    assert!(f.close().is_err(), "close before the last batch is emitted");
    f.emit(&[Verdict::Keep]).unwrap();
    assert!(f.next_batch().unwrap().is_none());
    let last = f.close().unwrap();
    assert!(last.bytes.is_empty());
    assert_eq!(f.totals().kept, 2);
}

#[test]
fn parquet_is_not_streamed_and_filters_are_send() {
    assert!(matches!(
        StreamFilter::new(
            &spec(Format::Parquet, "id"),
            Compression::Identity,
            Limits::default()
        ),
        Err(BulkError::NotStreamable { .. })
    ));
    fn send<T: Send>() {}
    send::<StreamFilter>();
    send::<ParquetFilter<std::fs::File>>();
    send::<Batch<'static>>();
}

/// The fuzz entry point over a fixed corpus: the same checks the fuzz target runs.
#[test]
fn fuzz_corpus_runs_clean() {
    let mut corpus: Vec<Vec<u8>> = vec![
        JSONL.as_bytes().to_vec(),
        CSV.as_bytes().to_vec(),
        b"".to_vec(),
        b"\n\n\n".to_vec(),
        b"\"".to_vec(),
        b"id\n\"".to_vec(),
        b"{\"id\":\"\\ud800\"}\n".to_vec(),
        b"\xEF\xBB\xBF".to_vec(),
        vec![b'x'; 1000],
        b"{\"id\":\"a\"}\n".repeat(40),
        b"id,name\n1,\"a\nb\"\n\"2\",c\n\n".to_vec(),
        b"{\"u\":{\"id\":\"x\"},\"a\":[0,\"y\"]}\r\n{\"~1x~0\":\"z\"}".to_vec(),
        gzip(b"{\"id\":\"a\"}\n"),
        zstd::encode_all(&b"{\"id\":\"a\"}\n"[..], 1).unwrap(),
    ];
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..40 {
        let len = rng.usize(0..400);
        let alphabet = b"{}[]\",:\\\n\r idnameu01ax~/\xEF\xBB\xBF";
        corpus.push(
            (0..len)
                .map(|_| alphabet[rng.usize(0..alphabet.len())])
                .collect(),
        );
    }
    // The first byte picks format (bit 0), subject (bits 1-3) and compression (bits 4-5).
    let selectors = [0u8, 1, 2, 3, 4, 5, 6, 8, 0x10, 0x11, 0x12, 0x23, 0x24, 0x21];
    for input in &corpus {
        for sel in selectors {
            let mut data = vec![sel];
            data.extend_from_slice(input);
            fuzz_bytes(&data);
        }
    }
    let report = fuzz_one(
        &spec(Format::Jsonl, "user_id"),
        Compression::Gzip,
        JSONL.as_bytes(),
    );
    assert!(report.totals.kept > 0 && report.output.is_ok());
}

/// The fuzz entry point on random inputs built from record-like pieces, for longer runs
/// than the corpus: `BULK_FUZZ_ITERS=100000 cargo test --release --lib fuzz_random -- --ignored`.
#[test]
#[ignore]
fn fuzz_random_inputs() {
    let iters: usize = std::env::var("BULK_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let pieces: &[&[u8]] = &[
        b"{\"id\":\"a\"}",
        b"{\"id\":7}",
        b"{\"u\":{\"id\":\"b\"}}",
        b"{\"a\":[0,\"c\"]}",
        b"\"",
        b",",
        b"\n",
        b"\r\n",
        b"\r",
        b" ",
        b"id",
        b"name",
        b"a b",
        b"\"\"",
        b"\\",
        b"\\u00e9",
        b"\xEF\xBB\xBF",
        b"\xff",
        b"{",
        b"}",
        b"[",
        b"]",
        b":",
        b"x",
        b"null",
        b"1.5",
        b"-0",
    ];
    let mut rng = fastrand::Rng::with_seed(
        std::env::var("BULK_FUZZ_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1),
    );
    for _ in 0..iters {
        let mut data = vec![rng.u8(..)];
        for _ in 0..rng.usize(0..60) {
            if rng.u8(..) < 20 {
                data.extend(std::iter::repeat_n(b'x', rng.usize(0..300)));
            } else {
                data.extend_from_slice(pieces[rng.usize(0..pieces.len())]);
            }
        }
        fuzz_bytes(&data);
    }
}
