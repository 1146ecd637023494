//! The streaming filter for JSON lines and CSV: bytes in (pushed as they arrive), batches
//! of parsed records out, and for each batch, once the caller has decided, the kept
//! records' bytes, compressed as the object was. Memory is one batch plus one partial
//! record plus one decompressed block, whatever the object's size.

use super::BulkError;
use super::batch::{Batch, BatchMeta, Counts, Emitted, Reason, Rec, Slot, Verdict};
use super::codec::{Decoder, Encoder};
use super::csv;
use super::jsonl;
use super::spec::{Compression, Format, PointerToken, RecordsSpec, SubjectPath};
use bytes::{Buf, Bytes};
use std::collections::VecDeque;

/// How much is decompressed at a time.
const BLOCK: usize = 64 * 1024;
/// The largest record limit accepted (offsets within a batch are 32-bit).
const MAX_RECORD_LIMIT: usize = 1 << 30;
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Bounds on a batch and on one record.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Records per batch at most.
    pub max_records: usize,
    /// Bytes per batch at most: its records, and the header row and blank lines among them
    /// (a single record larger than this is a batch alone).
    pub max_bytes: usize,
    /// A record longer than this (terminator included) is dropped `unparsable` without
    /// being buffered; at most 1 GiB.
    pub max_record_bytes: usize,
    /// A zstd frame needing a window larger than 2^this bytes is refused (this bounds the
    /// decoder's memory).
    pub zstd_window_log_max: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_records: 4096,
            max_bytes: 1 << 20,
            max_record_bytes: 8 << 20,
            zstd_window_log_max: 24,
        }
    }
}

enum Parser {
    Jsonl(Box<[PointerToken]>),
    Csv { column: Box<str>, header: Header },
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Header {
    /// Not yet read.
    Pending,
    /// Read: the number of fields every row must have, and the subject column (`None`: no
    /// column of that name, or several).
    Read {
        fields: usize,
        column: Option<usize>,
    },
    /// Malformed or too long: no row can be read against it.
    Broken,
}

/// Where the scan of buffered bytes stopped.
#[derive(PartialEq, Eq)]
enum Scan {
    /// The batch is full.
    Full,
    /// Every buffered byte has been scanned.
    NeedData,
}

/// Filters a JSON-lines or CSV object as it streams.
///
/// Drive it like this: [`push`](Self::push) a chunk of the upstream body; take every
/// [`next_batch`](Self::next_batch) until it returns `None`, and for each, decide and
/// [`emit`](Self::emit) (send the bytes it returns only after the batch's disclosure is
/// logged); repeat; at the end of the body call [`finish`](Self::finish), drain the last
/// batches the same way, and send what [`close`](Self::close) returns. Push a chunk only
/// when `next_batch` has returned `None`: that keeps memory bounded.
pub struct StreamFilter {
    parser: Parser,
    limits: Limits,
    forward_blank: bool,
    decoder: Decoder,
    encoder: Encoder,
    input: VecDeque<Bytes>,
    input_done: bool,
    /// The final unterminated record has been taken (after `finish`).
    ended: bool,
    closed: bool,
    /// Decompressed bytes: the current batch's region, then the record being scanned.
    buf: Vec<u8>,
    /// Start of the line or row being scanned; the current batch's region is `..unit_start`.
    unit_start: usize,
    /// Where scanning resumes (the bytes from `unit_start` to here hold no terminator).
    scan: usize,
    /// CSV quoting state at `scan`.
    row_scan: csv::RowScan,
    /// Bytes skipped so far of a record too long to buffer.
    skipping: Option<u64>,
    /// No line or row has been taken yet (a byte-order mark may start the object).
    first_unit: bool,
    /// The CSV header row's place in `buf`, until it is sent.
    header_span: Option<(usize, usize)>,
    batch: BatchMeta,
    /// The batch has been cut and waits for its verdicts.
    ready: bool,
    /// Cut a batch from whatever complete records are buffered when input runs dry.
    cut_now: bool,
    /// Counts accrued for the next batch (header, blank lines, raw bytes read).
    pending: Counts,
    totals: Counts,
    failed: Option<BulkError>,
}

impl StreamFilter {
    /// A filter for records of `spec` compressed as `compression`. Parquet cannot be
    /// streamed (see [`ParquetFilter`](super::ParquetFilter)).
    pub fn new(
        spec: &RecordsSpec,
        compression: Compression,
        limits: Limits,
    ) -> Result<StreamFilter, BulkError> {
        let parser = match (&spec.format, &spec.subject) {
            (Format::Jsonl, SubjectPath::Pointer(p)) => Parser::Jsonl(p.clone()),
            (Format::Csv, SubjectPath::Column(c)) => Parser::Csv {
                column: c.clone(),
                header: Header::Pending,
            },
            (format, _) => return Err(BulkError::NotStreamable { format: *format }),
        };
        let limits = Limits {
            max_records: limits.max_records.max(1),
            max_bytes: limits.max_bytes.clamp(1, MAX_RECORD_LIMIT),
            max_record_bytes: limits.max_record_bytes.clamp(1, MAX_RECORD_LIMIT),
            zstd_window_log_max: limits.zstd_window_log_max,
        };
        Ok(StreamFilter {
            parser,
            limits,
            forward_blank: false,
            decoder: Decoder::new(compression, limits.zstd_window_log_max)?,
            encoder: Encoder::new(compression)?,
            input: VecDeque::new(),
            input_done: false,
            ended: false,
            closed: false,
            buf: Vec::new(),
            unit_start: 0,
            scan: 0,
            row_scan: csv::RowScan::default(),
            skipping: None,
            first_unit: true,
            header_span: None,
            batch: BatchMeta::default(),
            ready: false,
            cut_now: false,
            pending: Counts::default(),
            totals: Counts::default(),
            failed: None,
        })
    }

    /// Forward blank lines (which are not records) instead of dropping them, so that in
    /// audit mode, with every record kept, the output is the input byte for byte.
    pub fn forward_blank_lines(mut self, yes: bool) -> StreamFilter {
        self.forward_blank = yes;
        self
    }

    /// Adds a chunk of the upstream body (compressed as the object is).
    pub fn push(&mut self, chunk: Bytes) {
        if self.input_done {
            self.failed
                .get_or_insert(BulkError::Misuse("input was pushed after finish"));
        } else if !chunk.is_empty() {
            self.input.push_back(chunk);
        }
    }

    /// Whether every pushed byte has been taken in (the time to push the next chunk).
    pub fn wants_input(&self) -> bool {
        self.input.is_empty()
    }

    /// The upstream body has ended.
    pub fn finish(&mut self) {
        self.input_done = true;
    }

    /// The next batch of records, once a batch is full (or, after `finish`, the last
    /// records); `None` when more input is needed, or at the end. The same batch is
    /// returned until it is emitted.
    ///
    /// A batch holds no records only when blank lines alone filled it: emit it with no
    /// verdicts. An error (a corrupt or truncated compressed stream) is final: the records
    /// after it cannot be read, and the response must end with an error.
    pub fn next_batch(&mut self) -> Result<Option<Batch<'_>>, BulkError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.advance() {
            Ok(true) => Ok(Some(self.view())),
            Ok(false) => Ok(None),
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Like [`next_batch`](Self::next_batch), but when the input runs dry, cuts a batch from
    /// the complete records buffered so far rather than waiting for a full one (for an
    /// upstream that pauses: the records received should not wait for the next ones).
    pub fn next_batch_now(&mut self) -> Result<Option<Batch<'_>>, BulkError> {
        self.cut_now = true;
        let ready = self.next_batch().map(|b| b.is_some());
        self.cut_now = false;
        match ready {
            Ok(true) => Ok(Some(self.view())),
            Ok(false) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The batch waiting for verdicts, if any.
    pub fn current_batch(&self) -> Option<Batch<'_>> {
        self.ready.then(|| self.view())
    }

    /// Applies one verdict per record of the current batch: returns the bytes to send
    /// (the kept records in order, the CSV header before the first batch; compressed and
    /// flushed so the client can read them now) and the batch's counts.
    pub fn emit(&mut self, verdicts: &[Verdict]) -> Result<Emitted, BulkError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if !self.ready {
            return Err(BulkError::Misuse("emit was called with no batch waiting"));
        }
        if verdicts.len() != self.batch.recs.len() {
            return Err(BulkError::VerdictCount {
                expected: self.batch.recs.len(),
                got: verdicts.len(),
            });
        }
        match self.emit_region(verdicts) {
            Ok(e) => Ok(e),
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }

    /// Ends the output once every batch is emitted: the header and blank lines not yet
    /// sent (an object with no records), and the compressed stream's end.
    pub fn close(&mut self) -> Result<Emitted, BulkError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.closed {
            return Err(BulkError::Misuse("close was called twice"));
        }
        if !self.input_done || !self.ended || self.ready || !self.batch.recs.is_empty() {
            return Err(BulkError::Misuse(
                "close was called before finish and before every batch was emitted",
            ));
        }
        let result = self.emit_region(&[]).and_then(|mut e| {
            let mut out = Vec::from(e.bytes);
            let before = out.len();
            self.encoder.finish(&mut out)?;
            let tail = (out.len() - before) as u64;
            e.counts.bytes_out += tail;
            self.totals.bytes_out += tail;
            e.bytes = Bytes::from(out);
            Ok(e)
        });
        self.closed = true;
        result.inspect_err(|e| self.failed = Some(e.clone()))
    }

    /// Counts over every emitted batch so far.
    pub fn totals(&self) -> &Counts {
        &self.totals
    }

    /// The capacity of the internal buffer, in bytes (it bounds the filter's memory).
    pub fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    fn view(&self) -> Batch<'_> {
        Batch {
            meta: &self.batch,
            buf: &self.buf,
        }
    }

    /// Reads until a batch is ready (`true`) or input is needed or over (`false`).
    fn advance(&mut self) -> Result<bool, BulkError> {
        if self.ready {
            return Ok(true);
        }
        loop {
            if self.scan_units() == Scan::Full {
                break;
            }
            if self.fill()? {
                continue;
            }
            if !self.input_done {
                if self.cut_now && !self.batch.recs.is_empty() {
                    break;
                }
                return Ok(false);
            }
            if !self.ended {
                self.decoder.finish()?;
                if !self.take_last_unit() {
                    break;
                }
                self.ended = true;
            }
            if self.batch.recs.is_empty() {
                return Ok(false);
            }
            break;
        }
        self.batch.index_subjects(&self.buf);
        self.ready = true;
        Ok(true)
    }

    /// Decompresses one block of pending input onto the buffer. `false` if there was
    /// nothing to do.
    fn fill(&mut self) -> Result<bool, BulkError> {
        let Some(front) = self.input.front_mut() else {
            if self.decoder.is_identity() {
                return Ok(false);
            }
            // The decoder may still hold output for input it has already consumed.
            let old = self.buf.len();
            self.buf.resize(old + BLOCK, 0);
            let (_, made) = self.decoder.decode(&[], &mut self.buf[old..])?;
            self.buf.truncate(old + made);
            return Ok(made > 0);
        };
        let used = if self.decoder.is_identity() {
            let n = front.len().min(BLOCK);
            self.buf.extend_from_slice(&front[..n]);
            n
        } else {
            let old = self.buf.len();
            self.buf.resize(old + BLOCK, 0);
            let (used, made) = self.decoder.decode(front, &mut self.buf[old..])?;
            self.buf.truncate(old + made);
            if used == 0 && made == 0 {
                return Err(BulkError::Corrupt {
                    codec: "compressed",
                    offset: self.pending.bytes_in_raw + self.totals.bytes_in_raw,
                    detail: "the decoder made no progress".into(),
                });
            }
            used
        };
        front.advance(used);
        if front.is_empty() {
            self.input.pop_front();
        }
        self.pending.bytes_in_raw += used as u64;
        Ok(true)
    }

    /// Takes every complete line or row buffered into the batch, until it is full.
    fn scan_units(&mut self) -> Scan {
        loop {
            if self.batch.recs.len() >= self.limits.max_records {
                return Scan::Full;
            }
            let found = match self.parser {
                Parser::Jsonl(_) => {
                    memchr::memchr(b'\n', &self.buf[self.scan..]).map(|i| self.scan + i)
                }
                Parser::Csv { .. } => csv::find_row_end(&self.buf, self.scan, &mut self.row_scan),
            };
            let Some(nl) = found else {
                let partial = self.buf.len() - self.unit_start;
                if self.skipping.is_some() || partial > self.limits.max_record_bytes {
                    // Too long to buffer: count its bytes and let them go.
                    *self.skipping.get_or_insert(0) += partial as u64;
                    self.buf.truncate(self.unit_start);
                }
                self.scan = self.buf.len();
                return Scan::NeedData;
            };
            let end = nl + 1;
            let size = (end - self.unit_start) as u64;
            if let Some(skipped) = self.skipping.take() {
                self.unbuffered(skipped + size, end);
                continue;
            }
            if size > self.limits.max_record_bytes as u64 {
                self.unbuffered(size, end);
                continue;
            }
            if !self.take_unit(nl, end) {
                self.scan = self.unit_start;
                return Scan::Full;
            }
        }
    }

    /// After the input's end: takes the last line or row, which has no terminator. `false`
    /// if the batch is full (cut it, then call again).
    fn take_last_unit(&mut self) -> bool {
        if self.batch.recs.len() >= self.limits.max_records {
            return false;
        }
        if let Some(skipped) = self.skipping.take() {
            let end = self.buf.len();
            self.unbuffered(skipped + (end - self.unit_start) as u64, end);
            return true;
        }
        let end = self.buf.len();
        if end == self.unit_start {
            return true;
        }
        self.take_unit(end, end)
    }

    /// A record (or CSV header) too long to buffer, ending at `end`: dropped `unparsable`.
    fn unbuffered(&mut self, size: u64, end: usize) {
        self.buf.drain(self.unit_start..end);
        self.scan = self.unit_start;
        self.row_scan = csv::RowScan::default();
        if let Parser::Csv { header, .. } = &mut self.parser
            && *header == Header::Pending
        {
            *header = Header::Broken;
        }
        self.first_unit = false;
        self.batch.recs.push(Rec {
            start: self.unit_start,
            end: self.unit_start,
            size,
            slot: Slot::Missing(Reason::UNPARSABLE),
            id: u32::MAX,
        });
    }

    /// Takes the line or row from `unit_start` to `end` (its content ending at `content_end`,
    /// before the newline). `false` if it would overfill the batch's bytes.
    fn take_unit(&mut self, content_end: usize, end: usize) -> bool {
        let start = self.unit_start;
        let size = end - start;
        // The batch's region (records, header, blank lines) stays within `max_bytes`, unless
        // one unit alone exceeds it.
        if start > 0 && start + size > self.limits.max_bytes {
            return false;
        }
        let mut content = &self.buf[start..content_end];
        let bom = self.first_unit && content.starts_with(BOM);
        let slot = match &mut self.parser {
            Parser::Jsonl(path) => {
                if jsonl::is_blank(content) {
                    self.pending.blank_bytes += size as u64;
                    self.next_unit(end);
                    return true;
                }
                let skip = if bom { BOM.len() } else { 0 };
                match jsonl::subject(&content[skip..], path, &mut self.batch.arena) {
                    Slot::Line(off, len) => Slot::Line(off + skip as u32, len),
                    other => other,
                }
            }
            Parser::Csv { column, header } => {
                if let [rest @ .., b'\r'] = content {
                    content = rest;
                }
                if content.is_empty() {
                    self.pending.blank_bytes += size as u64;
                    self.next_unit(end);
                    return true;
                }
                if *header == Header::Pending {
                    let skip = if bom { BOM.len() } else { 0 };
                    *header = read_header(&content[skip..], column.as_bytes());
                    self.header_span = Some((start, end));
                    self.pending.header_bytes += size as u64;
                    self.next_unit(end);
                    return true;
                }
                match *header {
                    Header::Read { fields, column } => {
                        match csv::parse_row(content, column.unwrap_or(usize::MAX)) {
                            Ok((n, _)) if n != fields => Slot::Missing(Reason::UNPARSABLE),
                            Ok((_, Some(field))) => {
                                csv::field_slot(content, field, &mut self.batch.arena)
                            }
                            Ok((_, None)) => Slot::Missing(Reason::NO_SUBJECT),
                            Err(()) => Slot::Missing(Reason::UNPARSABLE),
                        }
                    }
                    Header::Broken | Header::Pending => Slot::Missing(Reason::UNPARSABLE),
                }
            }
        };
        self.batch.recs.push(Rec {
            start,
            end,
            size: size as u64,
            slot,
            id: u32::MAX,
        });
        self.batch.data_bytes += size;
        self.next_unit(end);
        true
    }

    fn next_unit(&mut self, end: usize) {
        self.unit_start = end;
        self.scan = end;
        self.first_unit = false;
    }

    /// Writes the current region: the batch's kept records in order, with the CSV header
    /// and (when forwarded) blank lines where they stand; then drops the region from the
    /// buffer.
    fn emit_region(&mut self, verdicts: &[Verdict]) -> Result<Emitted, BulkError> {
        let mut counts = std::mem::take(&mut self.pending);
        let mut out = Vec::with_capacity(self.batch.data_bytes / 2 + 64);
        // A run of contiguous bytes to write, to write each run at once.
        let mut run: Option<(usize, usize)> = None;
        let mut pos = 0;
        for (i, &verdict) in verdicts.iter().enumerate() {
            let rec = self.batch.recs[i];
            self.gap(pos, rec.start, &mut run, &mut out)?;
            pos = rec.end;
            let keep = match verdict {
                _ if rec.is_unbuffered() => Err(Reason::UNPARSABLE),
                Verdict::Keep => Ok(None),
                Verdict::KeepAudit(r) => Ok(Some(r)),
                Verdict::Drop(r) => Err(r),
            };
            match keep {
                Ok(would_drop) => {
                    counts.count_kept(rec.size, would_drop);
                    extend_run(
                        &mut run,
                        rec.start,
                        rec.end,
                        &self.buf,
                        &mut self.encoder,
                        &mut out,
                    )?;
                }
                Err(reason) => counts.count_dropped(rec.size, reason),
            }
        }
        self.gap(pos, self.unit_start, &mut run, &mut out)?;
        if let Some((s, e)) = run {
            self.encoder.write(&self.buf[s..e], &mut out)?;
        }
        self.encoder.flush(&mut out)?;

        let region = self.unit_start;
        self.buf.drain(..region);
        self.unit_start = 0;
        self.scan -= region;
        self.header_span = None;
        self.batch.clear();
        self.ready = false;

        counts.bytes_in =
            counts.header_bytes + counts.blank_bytes + counts.kept_bytes + counts.dropped_bytes;
        counts.bytes_out = out.len() as u64;
        self.totals.add(&counts);
        Ok(Emitted {
            bytes: Bytes::from(out),
            counts,
        })
    }

    /// The bytes between two records (or after the last): the CSV header is always
    /// written, blank lines only when forwarded.
    fn gap(
        &mut self,
        from: usize,
        to: usize,
        run: &mut Option<(usize, usize)>,
        out: &mut Vec<u8>,
    ) -> Result<(), BulkError> {
        if from == to {
            return Ok(());
        }
        if self.forward_blank {
            return extend_run(run, from, to, &self.buf, &mut self.encoder, out);
        }
        match self.header_span {
            Some((s, e)) if from <= s && e <= to => {
                extend_run(run, s, e, &self.buf, &mut self.encoder, out)
            }
            _ => Ok(()),
        }
    }
}

/// Adds `start..end` to the run being written, writing the run out first if the two are
/// not contiguous.
fn extend_run(
    run: &mut Option<(usize, usize)>,
    start: usize,
    end: usize,
    buf: &[u8],
    encoder: &mut Encoder,
    out: &mut Vec<u8>,
) -> Result<(), BulkError> {
    match run {
        Some((_, e)) if *e == start => *e = end,
        _ => {
            if let Some((s, e)) = run.take() {
                encoder.write(&buf[s..e], out)?;
            }
            *run = Some((start, end));
        }
    }
    Ok(())
}

/// Reads a CSV header row: the number of fields and which one is the subject column.
fn read_header(row: &[u8], column: &[u8]) -> Header {
    let Ok(names) = csv::header_names(row) else {
        return Header::Broken;
    };
    let mut matches = names
        .iter()
        .enumerate()
        .filter(|(_, n)| n.as_slice() == column);
    let column = match (matches.next(), matches.next()) {
        (Some((i, _)), None) => Some(i),
        _ => None,
    };
    Header::Read {
        fields: names.len(),
        column,
    }
}
