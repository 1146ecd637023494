//! Push-model decompression of the upstream body and compression of the filtered output:
//! gzip (one or several members, checked against their CRC-32 and length) and Zstandard.
//! Output is bounded per call, so a small input that inflates hugely never floods memory.

use super::BulkError;
use super::spec::Compression;
use flate2::{Compress, Crc, Decompress, FlushCompress, FlushDecompress, Status};
use zstd::stream::raw::{CParameter, DParameter, InBuffer, Operation, OutBuffer};

/// gzip level of the output: the fastest, since the filter must keep up with the network.
const GZIP_LEVEL: u32 = 1;
/// zstd level of the output, for the same reason.
const ZSTD_LEVEL: i32 = 1;
/// A gzip header longer than this (a huge file name or comment) is refused as corrupt.
const MAX_GZIP_HEADER: usize = 64 * 1024;

/// Decompresses an object's bytes as they arrive.
pub struct Decoder {
    kind: DecoderKind,
    /// Compressed bytes consumed so far, for error messages.
    consumed: u64,
}

enum DecoderKind {
    Identity,
    Gzip(Box<GzipDecoder>),
    Zstd(ZstdDecoder),
}

impl Decoder {
    /// A decoder for `compression`. A zstd frame may not need a window above
    /// 2^`zstd_window_log_max` bytes (this bounds the decoder's memory).
    pub fn new(compression: Compression, zstd_window_log_max: u32) -> Result<Decoder, BulkError> {
        let kind = match compression {
            Compression::Identity => DecoderKind::Identity,
            Compression::Gzip => DecoderKind::Gzip(Box::new(GzipDecoder::new())),
            Compression::Zstd => {
                let mut d = zstd::stream::raw::Decoder::new().map_err(|e| corrupt("zstd", 0, e))?;
                d.set_parameter(DParameter::WindowLogMax(zstd_window_log_max))
                    .map_err(|e| corrupt("zstd", 0, e))?;
                DecoderKind::Zstd(ZstdDecoder {
                    dctx: d,
                    in_frame: false,
                })
            }
        };
        Ok(Decoder { kind, consumed: 0 })
    }

    /// Decompresses from `input` into `out`, writing at most `out.len()` bytes. Returns the
    /// bytes of `input` consumed and of `out` written. Call again with the rest of the input
    /// (or with none, when `out` was filled: the decoder may hold more).
    pub fn decode(&mut self, input: &[u8], out: &mut [u8]) -> Result<(usize, usize), BulkError> {
        let at = self.consumed;
        let (used, made) = match &mut self.kind {
            DecoderKind::Identity => {
                let n = input.len().min(out.len());
                out[..n].copy_from_slice(&input[..n]);
                (n, n)
            }
            DecoderKind::Gzip(g) => g.decode(input, out, at)?,
            DecoderKind::Zstd(z) => z.decode(input, out, at)?,
        };
        self.consumed += used as u64;
        Ok((used, made))
    }

    /// Whether the bytes pass through as they are.
    pub fn is_identity(&self) -> bool {
        matches!(self.kind, DecoderKind::Identity)
    }

    /// Checks that the input ended where a gzip member or zstd frame ends.
    pub fn finish(&self) -> Result<(), BulkError> {
        let complete = match &self.kind {
            DecoderKind::Identity => true,
            DecoderKind::Gzip(g) => matches!(g.state, GzState::Between),
            DecoderKind::Zstd(z) => !z.in_frame,
        };
        if complete {
            Ok(())
        } else {
            Err(BulkError::Truncated {
                codec: self.codec(),
                offset: self.consumed,
            })
        }
    }

    fn codec(&self) -> &'static str {
        match self.kind {
            DecoderKind::Identity => "identity",
            DecoderKind::Gzip(_) => "gzip",
            DecoderKind::Zstd(_) => "zstd",
        }
    }
}

fn corrupt(codec: &'static str, offset: u64, detail: impl ToString) -> BulkError {
    BulkError::Corrupt {
        codec,
        offset,
        detail: detail.to_string(),
    }
}

struct ZstdDecoder {
    dctx: zstd::stream::raw::Decoder<'static>,
    /// Input of a frame not yet fully decoded has been consumed.
    in_frame: bool,
}

impl ZstdDecoder {
    fn decode(
        &mut self,
        input: &[u8],
        out: &mut [u8],
        at: u64,
    ) -> Result<(usize, usize), BulkError> {
        let (mut used, mut made) = (0, 0);
        loop {
            let st = self
                .dctx
                .run_on_buffers(&input[used..], &mut out[made..])
                .map_err(|e| corrupt("zstd", at + used as u64, e))?;
            used += st.bytes_read;
            made += st.bytes_written;
            if st.bytes_read > 0 {
                self.in_frame = true;
            }
            // 0: a frame was just decoded and flushed whole.
            if st.remaining == 0 {
                self.in_frame = false;
            }
            let stalled = st.bytes_read == 0 && st.bytes_written == 0;
            if made == out.len() || (used == input.len() && st.bytes_written == 0) || stalled {
                return Ok((used, made));
            }
        }
    }
}

enum GzState {
    /// Collecting a member's header.
    Header,
    /// Inflating a member's deflate stream.
    Body,
    /// Collecting a member's 8-byte trailer.
    Trailer,
    /// At a member boundary (or before the first): the input may end here.
    Between,
}

struct GzipDecoder {
    state: GzState,
    inflate: Decompress,
    crc: Crc,
    /// The header or trailer collected so far.
    pending: Vec<u8>,
}

impl GzipDecoder {
    fn new() -> GzipDecoder {
        GzipDecoder {
            state: GzState::Between,
            inflate: Decompress::new(false),
            crc: Crc::new(),
            pending: Vec::new(),
        }
    }

    fn decode(
        &mut self,
        input: &[u8],
        out: &mut [u8],
        at: u64,
    ) -> Result<(usize, usize), BulkError> {
        let (mut used, mut made) = (0, 0);
        loop {
            let rest = &input[used..];
            match self.state {
                GzState::Between => {
                    if rest.is_empty() {
                        break;
                    }
                    self.pending.clear();
                    self.state = GzState::Header;
                }
                GzState::Header => {
                    if rest.is_empty() {
                        break;
                    }
                    let before = self.pending.len();
                    let take = rest.len().min(MAX_GZIP_HEADER + 1 - before);
                    self.pending.extend_from_slice(&rest[..take]);
                    match gzip_header_len(&self.pending) {
                        Ok(Some(len)) => {
                            used += len - before;
                            self.pending.clear();
                            self.inflate.reset(false);
                            self.crc.reset();
                            self.state = GzState::Body;
                        }
                        Ok(None) if self.pending.len() > MAX_GZIP_HEADER => {
                            return Err(corrupt(
                                "gzip",
                                at + used as u64,
                                "the header is longer than 64 KiB",
                            ));
                        }
                        Ok(None) => used += take,
                        Err(e) => return Err(corrupt("gzip", at + used as u64, e)),
                    }
                }
                GzState::Body => {
                    if made == out.len() {
                        break;
                    }
                    let (in0, out0) = (self.inflate.total_in(), self.inflate.total_out());
                    let status = self
                        .inflate
                        .decompress(rest, &mut out[made..], FlushDecompress::None)
                        .map_err(|e| corrupt("gzip", at + used as u64, e))?;
                    let read = (self.inflate.total_in() - in0) as usize;
                    let wrote = (self.inflate.total_out() - out0) as usize;
                    self.crc.update(&out[made..made + wrote]);
                    used += read;
                    made += wrote;
                    if status == Status::StreamEnd {
                        self.state = GzState::Trailer;
                    } else if read == 0 && wrote == 0 {
                        break;
                    }
                }
                GzState::Trailer => {
                    if rest.is_empty() {
                        break;
                    }
                    let take = rest.len().min(8 - self.pending.len());
                    self.pending.extend_from_slice(&rest[..take]);
                    used += take;
                    if self.pending.len() == 8 {
                        let p = &self.pending;
                        let crc = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
                        let size = u32::from_le_bytes([p[4], p[5], p[6], p[7]]);
                        if crc != self.crc.sum() || size != self.crc.amount() {
                            return Err(corrupt(
                                "gzip",
                                at + used as u64,
                                "a member's CRC-32 or length does not match its data",
                            ));
                        }
                        self.state = GzState::Between;
                    }
                }
            }
        }
        Ok((used, made))
    }
}

/// The length of the gzip member header at the start of `h` (RFC 1952 section 2.3), or
/// `None` if `h` holds only part of it.
fn gzip_header_len(h: &[u8]) -> Result<Option<usize>, &'static str> {
    const FHCRC: u8 = 2;
    const FEXTRA: u8 = 4;
    const FNAME: u8 = 8;
    const FCOMMENT: u8 = 16;
    if h.len() >= 2 && (h[0] != 0x1f || h[1] != 0x8b) {
        return Err("not a gzip member (bad magic bytes)");
    }
    if h.len() >= 3 && h[2] != 8 {
        return Err("a gzip member uses a compression method other than deflate");
    }
    if h.len() < 10 {
        return Ok(None);
    }
    let flags = h[3];
    if flags & 0xe0 != 0 {
        return Err("a gzip header sets reserved flags");
    }
    let mut pos = 10;
    if flags & FEXTRA != 0 {
        if h.len() < pos + 2 {
            return Ok(None);
        }
        pos += 2 + u16::from_le_bytes([h[pos], h[pos + 1]]) as usize;
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            match h.get(pos..).and_then(|rest| memchr::memchr(0, rest)) {
                Some(nul) => pos += nul + 1,
                None => return Ok(None),
            }
        }
    }
    if flags & FHCRC != 0 {
        pos += 2;
    }
    Ok((h.len() >= pos).then_some(pos))
}

/// Compresses the filtered output the way the object was compressed.
pub(crate) enum Encoder {
    Identity,
    Gzip(Box<GzipEncoder>),
    Zstd(zstd::stream::raw::Encoder<'static>),
}

pub(crate) struct GzipEncoder {
    deflate: Compress,
    crc: Crc,
    started: bool,
}

impl Encoder {
    pub fn new(compression: Compression) -> Result<Encoder, BulkError> {
        Ok(match compression {
            Compression::Identity => Encoder::Identity,
            Compression::Gzip => Encoder::Gzip(Box::new(GzipEncoder {
                deflate: Compress::new(flate2::Compression::new(GZIP_LEVEL), false),
                crc: Crc::new(),
                started: false,
            })),
            Compression::Zstd => {
                let mut e =
                    zstd::stream::raw::Encoder::new(ZSTD_LEVEL).map_err(compress_err("zstd"))?;
                e.set_parameter(CParameter::ChecksumFlag(true))
                    .map_err(compress_err("zstd"))?;
                Encoder::Zstd(e)
            }
        })
    }

    /// Compresses `data` onto `out`.
    pub fn write(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), BulkError> {
        match self {
            Encoder::Identity => out.extend_from_slice(data),
            Encoder::Gzip(g) => {
                g.start(out);
                g.crc.update(data);
                let mut rest = data;
                while !rest.is_empty() {
                    out.reserve(rest.len() / 2 + 1024);
                    let before = g.deflate.total_in();
                    g.deflate
                        .compress_vec(rest, out, FlushCompress::None)
                        .map_err(compress_err("gzip"))?;
                    rest = &rest[(g.deflate.total_in() - before) as usize..];
                }
            }
            Encoder::Zstd(z) => {
                let mut input = InBuffer::around(data);
                while input.pos() < data.len() {
                    out.reserve(data.len() / 2 + 1024);
                    let pos = out.len();
                    z.run(&mut input, &mut OutBuffer::around_pos(out, pos))
                        .map_err(compress_err("zstd"))?;
                }
            }
        }
        Ok(())
    }

    /// Pushes out everything written so far, so the client can decompress it now.
    pub fn flush(&mut self, out: &mut Vec<u8>) -> Result<(), BulkError> {
        match self {
            Encoder::Identity => {}
            Encoder::Gzip(g) => {
                if !g.started {
                    return Ok(());
                }
                // A sync flush is complete when it leaves room in the output.
                loop {
                    out.reserve(16 * 1024);
                    g.deflate
                        .compress_vec(&[], out, FlushCompress::Sync)
                        .map_err(compress_err("gzip"))?;
                    if out.len() < out.capacity() {
                        break;
                    }
                }
            }
            Encoder::Zstd(z) => loop {
                out.reserve(16 * 1024);
                let pos = out.len();
                let left = z
                    .flush(&mut OutBuffer::around_pos(out, pos))
                    .map_err(compress_err("zstd"))?;
                if left == 0 {
                    break;
                }
            },
        }
        Ok(())
    }

    /// Ends the compressed stream (gzip trailer, zstd end of frame).
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), BulkError> {
        match self {
            Encoder::Identity => {}
            Encoder::Gzip(g) => {
                g.start(out);
                loop {
                    out.reserve(16 * 1024);
                    let status = g
                        .deflate
                        .compress_vec(&[], out, FlushCompress::Finish)
                        .map_err(compress_err("gzip"))?;
                    if status == Status::StreamEnd {
                        break;
                    }
                }
                out.extend_from_slice(&g.crc.sum().to_le_bytes());
                out.extend_from_slice(&g.crc.amount().to_le_bytes());
            }
            Encoder::Zstd(z) => loop {
                out.reserve(16 * 1024);
                let pos = out.len();
                let left = z
                    .finish(&mut OutBuffer::around_pos(out, pos), true)
                    .map_err(compress_err("zstd"))?;
                if left == 0 {
                    break;
                }
            },
        }
        Ok(())
    }
}

impl GzipEncoder {
    /// Writes the member header once: no name, no time, "unknown" OS.
    fn start(&mut self, out: &mut Vec<u8>) {
        if !self.started {
            self.started = true;
            out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255]);
        }
    }
}

fn compress_err<E: ToString>(codec: &'static str) -> impl Fn(E) -> BulkError {
    move |e| BulkError::Compress {
        codec,
        detail: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// Decodes `input` fed in pieces of `step` bytes into outputs of `out_len` bytes.
    fn decode_all(
        c: Compression,
        input: &[u8],
        step: usize,
        out_len: usize,
    ) -> Result<Vec<u8>, BulkError> {
        let mut d = Decoder::new(c, 24)?;
        let mut out = Vec::new();
        let mut block = vec![0; out_len];
        for chunk in input.chunks(step.max(1)) {
            let mut rest = chunk;
            loop {
                let (used, made) = d.decode(rest, &mut block)?;
                out.extend_from_slice(&block[..made]);
                rest = &rest[used..];
                if rest.is_empty() && made < block.len() {
                    break;
                }
                assert!(used > 0 || made > 0, "the decoder stalled");
            }
        }
        d.finish()?;
        Ok(out)
    }

    #[test]
    fn gzip_members_concatenated_decode_whole_at_any_split() {
        let a: Vec<u8> = (0..5000u32)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        let mut input = gzip(&a);
        // A second member with every optional header field set.
        let mut b = flate2::GzBuilder::new()
            .filename("part2.jsonl")
            .comment("second")
            .extra(vec![1, 2, 3])
            .write(Vec::new(), flate2::Compression::fast());
        b.write_all(b"tail\n").unwrap();
        input.extend(b.finish().unwrap());
        let mut want = a.clone();
        want.extend_from_slice(b"tail\n");
        for step in [1, 7, 100, 4096, input.len()] {
            for out_len in [1, 13, 65536] {
                assert_eq!(
                    decode_all(Compression::Gzip, &input, step, out_len).unwrap(),
                    want
                );
            }
        }
    }

    #[test]
    fn corrupt_or_truncated_gzip_is_an_error() {
        let good = gzip(b"{\"a\":1}\n");
        let mut bad_crc = good.clone();
        let n = bad_crc.len();
        bad_crc[n - 8] ^= 1;
        assert!(matches!(
            decode_all(Compression::Gzip, &bad_crc, 3, 64),
            Err(BulkError::Corrupt { .. })
        ));
        assert!(matches!(
            decode_all(Compression::Gzip, &good[..n - 3], 3, 64),
            Err(BulkError::Truncated { .. })
        ));
        let mut junk = good.clone();
        junk.extend_from_slice(b"\0\0");
        assert!(matches!(
            decode_all(Compression::Gzip, &junk, 5, 64),
            Err(BulkError::Corrupt { .. })
        ));
        assert!(matches!(
            decode_all(Compression::Gzip, b"plain text", 5, 64),
            Err(BulkError::Corrupt { .. })
        ));
        // No bytes at all: an empty object.
        assert_eq!(decode_all(Compression::Gzip, b"", 5, 64).unwrap(), b"");
    }

    #[test]
    fn zstd_frames_concatenated_and_truncation() {
        let mut input = zstd::encode_all(&b"one\ntwo\n"[..], 3).unwrap();
        input.extend(zstd::encode_all(&b"three\n"[..], 19).unwrap());
        for step in [1, 5, input.len()] {
            assert_eq!(
                decode_all(Compression::Zstd, &input, step, 3).unwrap(),
                b"one\ntwo\nthree\n"
            );
        }
        assert!(matches!(
            decode_all(Compression::Zstd, &input[..input.len() - 2], 4, 64),
            Err(BulkError::Truncated { .. })
        ));
        assert!(matches!(
            decode_all(Compression::Zstd, b"not zstd", 4, 64),
            Err(BulkError::Corrupt { .. })
        ));
    }

    #[test]
    fn encoders_round_trip_with_flushes() {
        for c in [Compression::Gzip, Compression::Zstd] {
            let mut e = Encoder::new(c).unwrap();
            let mut out = Vec::new();
            let mut flushed_len = Vec::new();
            for i in 0..50 {
                e.write(format!("record {i}\n").as_bytes(), &mut out)
                    .unwrap();
                e.flush(&mut out).unwrap();
                flushed_len.push(out.len());
            }
            e.finish(&mut out).unwrap();
            let want: Vec<u8> = (0..50)
                .flat_map(|i| format!("record {i}\n").into_bytes())
                .collect();
            assert_eq!(decode_all(c, &out, 11, 100).unwrap(), want);
            // After each flush, what was written so far decodes to every record written.
            let prefix = &out[..flushed_len[9]];
            let mut got = Vec::new();
            match c {
                Compression::Gzip => {
                    let _ = flate2::read::GzDecoder::new(prefix).read_to_end(&mut got);
                }
                _ => {
                    let _ = zstd::stream::read::Decoder::new(prefix)
                        .unwrap()
                        .read_to_end(&mut got);
                }
            }
            assert_eq!(
                &got[..],
                &want[..(0..10).map(|i| format!("record {i}\n").len()).sum()]
            );
        }
        // Nothing written: still a valid, empty stream.
        let mut e = Encoder::new(Compression::Gzip).unwrap();
        let mut out = Vec::new();
        e.flush(&mut out).unwrap();
        e.finish(&mut out).unwrap();
        assert_eq!(decode_all(Compression::Gzip, &out, 3, 10).unwrap(), b"");
    }
}
