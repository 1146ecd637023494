//! A batch of parsed records as the caller sees it (subjects, distinct subjects), the
//! caller's keep/drop verdicts, and the counts the outcome record and metrics report.

use bytes::Bytes;
use compact_str::CompactString;
use std::fmt;

/// Why a record was (or, in audit mode, would have been) dropped: a small code. The filter
/// itself uses [`Reason::NO_SUBJECT`] and [`Reason::UNPARSABLE`]; every other code is the
/// caller's (a consent failure, a lookup that failed), counted separately.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reason(pub u8);

impl Reason {
    /// The record has no usable subject: the field is missing, null, empty, or not a string
    /// or an integer.
    pub const NO_SUBJECT: Reason = Reason(0);
    /// The record does not parse (or is longer than the record limit, or names its subject
    /// ambiguously), so what it holds cannot be known: fail closed.
    pub const UNPARSABLE: Reason = Reason(1);
    /// The first code free for the caller.
    pub const FIRST_CALLER: u8 = 2;

    /// The filter's own name for its codes, `None` for the caller's.
    pub fn builtin_name(self) -> Option<&'static str> {
        match self {
            Reason::NO_SUBJECT => Some("no_subject"),
            Reason::UNPARSABLE => Some("unparsable"),
            _ => None,
        }
    }
}

/// The caller's decision for one record.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forward the record.
    Keep,
    /// Drop the record, counted under the reason.
    Drop(Reason),
    /// Forward the record although it would be dropped for the reason (audit mode): counted
    /// as kept and as a would-drop. A record longer than the record limit is never buffered,
    /// so it cannot be forwarded and is counted as dropped `unparsable` whatever the verdict.
    KeepAudit(Reason),
}

/// Counts of one batch, or of the whole object so far.
///
/// For JSON lines and CSV, every decompressed byte is in exactly one of `header_bytes`,
/// `blank_bytes`, `kept_bytes` and `dropped_bytes`, so `bytes_in` is their sum. Parquet
/// records have no byte size of their own: there `bytes_in` counts the file's bytes read
/// and the per-record byte counts stay zero.
#[derive(Clone, PartialEq, Eq)]
pub struct Counts {
    /// Records seen (header row and blank lines are not records).
    pub records: u64,
    pub kept: u64,
    pub dropped: u64,
    pub kept_bytes: u64,
    pub dropped_bytes: u64,
    /// The CSV header row (always forwarded).
    pub header_bytes: u64,
    /// Blank lines between records (not records; forwarded only when asked to).
    pub blank_bytes: u64,
    /// Bytes received from upstream, before decompression.
    pub bytes_in_raw: u64,
    /// Bytes of the object after decompression.
    pub bytes_in: u64,
    /// Bytes handed out, compressed as the object was.
    pub bytes_out: u64,
    dropped_by: [u64; 256],
    would_drop_by: [u64; 256],
}

impl Default for Counts {
    fn default() -> Counts {
        Counts {
            records: 0,
            kept: 0,
            dropped: 0,
            kept_bytes: 0,
            dropped_bytes: 0,
            header_bytes: 0,
            blank_bytes: 0,
            bytes_in_raw: 0,
            bytes_in: 0,
            bytes_out: 0,
            dropped_by: [0; 256],
            would_drop_by: [0; 256],
        }
    }
}

impl Counts {
    /// Records dropped for `reason`.
    pub fn dropped_for(&self, reason: Reason) -> u64 {
        self.dropped_by[reason.0 as usize]
    }

    /// Records kept in audit mode that would have been dropped for `reason`.
    pub fn would_drop_for(&self, reason: Reason) -> u64 {
        self.would_drop_by[reason.0 as usize]
    }

    /// Every reason with a nonzero drop count, by code.
    pub fn dropped_by_reason(&self) -> impl Iterator<Item = (Reason, u64)> + '_ {
        nonzero(&self.dropped_by)
    }

    /// Every reason with a nonzero would-drop count (audit mode), by code.
    pub fn would_drop_by_reason(&self) -> impl Iterator<Item = (Reason, u64)> + '_ {
        nonzero(&self.would_drop_by)
    }

    /// Adds another batch's counts.
    pub fn add(&mut self, o: &Counts) {
        self.records += o.records;
        self.kept += o.kept;
        self.dropped += o.dropped;
        self.kept_bytes += o.kept_bytes;
        self.dropped_bytes += o.dropped_bytes;
        self.header_bytes += o.header_bytes;
        self.blank_bytes += o.blank_bytes;
        self.bytes_in_raw += o.bytes_in_raw;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        for (a, b) in self.dropped_by.iter_mut().zip(&o.dropped_by) {
            *a += b;
        }
        for (a, b) in self.would_drop_by.iter_mut().zip(&o.would_drop_by) {
            *a += b;
        }
    }

    pub(crate) fn count_kept(&mut self, size: u64, would_drop: Option<Reason>) {
        self.records += 1;
        self.kept += 1;
        self.kept_bytes += size;
        if let Some(r) = would_drop {
            self.would_drop_by[r.0 as usize] += 1;
        }
    }

    pub(crate) fn count_dropped(&mut self, size: u64, reason: Reason) {
        self.records += 1;
        self.dropped += 1;
        self.dropped_bytes += size;
        self.dropped_by[reason.0 as usize] += 1;
    }
}

fn nonzero(by: &[u64; 256]) -> impl Iterator<Item = (Reason, u64)> + '_ {
    by.iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(i, n)| (Reason(i as u8), *n))
}

impl fmt::Debug for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Counts")
            .field("records", &self.records)
            .field("kept", &self.kept)
            .field("dropped", &self.dropped)
            .field("kept_bytes", &self.kept_bytes)
            .field("dropped_bytes", &self.dropped_bytes)
            .field("header_bytes", &self.header_bytes)
            .field("blank_bytes", &self.blank_bytes)
            .field("bytes_in_raw", &self.bytes_in_raw)
            .field("bytes_in", &self.bytes_in)
            .field("bytes_out", &self.bytes_out)
            .field("dropped_by", &self.dropped_by_reason().collect::<Vec<_>>())
            .field(
                "would_drop_by",
                &self.would_drop_by_reason().collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// What one batch produced: the bytes to send (possibly empty) and the batch's counts.
#[derive(Debug)]
pub struct Emitted {
    pub bytes: Bytes,
    pub counts: Counts,
}

/// Where a record's subject is: in the record's own bytes (borrowed, the common case), in
/// the batch's arena (unescaped or formatted), or nowhere, with the reason.
#[derive(Copy, Clone, Debug)]
pub(crate) enum Slot {
    /// Offset from the record's start, and length.
    Line(u32, u32),
    /// Offset in the arena, and length.
    Arena(u32, u32),
    Missing(Reason),
}

/// One parsed record of a batch.
#[derive(Copy, Clone, Debug)]
pub(crate) struct Rec {
    /// The record's bytes in the filter's buffer, its line or row terminator included
    /// (empty for a record too long to buffer, and for Parquet rows).
    pub start: usize,
    pub end: usize,
    /// The record's size in the object (for an unbuffered record, the bytes skipped).
    pub size: u64,
    pub slot: Slot,
    /// Index into the batch's distinct subjects, set when the batch is cut.
    pub id: u32,
}

impl Rec {
    /// A record too long to buffer: its bytes were skipped, so it cannot be forwarded.
    pub fn is_unbuffered(&self) -> bool {
        self.start == self.end && self.size > 0
    }
}

/// The records of one batch and the subject text they do not borrow from the buffer.
#[derive(Default)]
pub(crate) struct BatchMeta {
    pub recs: Vec<Rec>,
    pub arena: String,
    /// The first record of each distinct subject, in order of first appearance.
    pub distinct: Vec<u32>,
    /// Record bytes buffered for the batch (what `max_bytes` bounds).
    pub data_bytes: usize,
}

impl BatchMeta {
    pub fn clear(&mut self) {
        self.recs.clear();
        self.arena.clear();
        self.distinct.clear();
        self.data_bytes = 0;
    }

    /// The subject's bytes (UTF-8, checked when the slot was made).
    pub fn subject_bytes<'a>(&'a self, buf: &'a [u8], r: &Rec) -> Result<&'a [u8], Reason> {
        match r.slot {
            Slot::Line(off, len) => {
                let s = r.start + off as usize;
                Ok(&buf[s..s + len as usize])
            }
            Slot::Arena(off, len) => Ok(&self.arena.as_bytes()[off as usize..(off + len) as usize]),
            Slot::Missing(reason) => Err(reason),
        }
    }

    pub fn subject<'a>(&'a self, buf: &'a [u8], r: &Rec) -> Result<&'a str, Reason> {
        // Without `unsafe`, the text is checked again; slots only hold checked text.
        std::str::from_utf8(self.subject_bytes(buf, r)?).map_err(|_| Reason::UNPARSABLE)
    }

    /// Numbers the distinct subjects, in order of first appearance.
    pub fn index_subjects(&mut self, buf: &[u8]) {
        let mut seen: foldhash::HashMap<&[u8], u32> = foldhash::HashMap::with_capacity_and_hasher(
            self.recs.len(),
            foldhash::fast::RandomState::default(),
        );
        let mut ids = Vec::with_capacity(self.recs.len());
        let mut distinct = std::mem::take(&mut self.distinct);
        distinct.clear();
        for (i, r) in self.recs.iter().enumerate() {
            let id = match self.subject_bytes(buf, r) {
                Ok(s) => *seen.entry(s).or_insert_with(|| {
                    distinct.push(i as u32);
                    (distinct.len() - 1) as u32
                }),
                Err(_) => u32::MAX,
            };
            ids.push(id);
        }
        drop(seen);
        for (r, id) in self.recs.iter_mut().zip(ids) {
            r.id = id;
        }
        self.distinct = distinct;
    }
}

/// A batch of records waiting for the caller's verdicts: each record's subject (or why it
/// has none) and the batch's distinct subjects. It borrows the filter; take what must live
/// across an `.await` with [`Batch::distinct_subjects`], then hand one verdict per record
/// to the filter's `emit`.
#[derive(Copy, Clone)]
pub struct Batch<'a> {
    pub(crate) meta: &'a BatchMeta,
    pub(crate) buf: &'a [u8],
}

/// One record of a batch.
#[derive(Copy, Clone, Debug)]
pub struct Record<'a> {
    subject: Result<&'a str, Reason>,
    id: u32,
    bytes: &'a [u8],
    size: u64,
}

impl<'a> Record<'a> {
    /// The record's subject, or why it has none ([`Reason::NO_SUBJECT`],
    /// [`Reason::UNPARSABLE`]).
    pub fn subject(&self) -> Result<&'a str, Reason> {
        self.subject
    }

    /// The index of the record's subject in [`Batch::distinct`], if it has one.
    pub fn subject_id(&self) -> Option<usize> {
        (self.id != u32::MAX).then_some(self.id as usize)
    }

    /// The record's bytes as they would be forwarded, terminator included; empty for a
    /// Parquet row and for a record too long to buffer.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The record's size in the object, in bytes (0 for a Parquet row).
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl<'a> Batch<'a> {
    pub fn len(&self) -> usize {
        self.meta.recs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.meta.recs.is_empty()
    }

    /// Record `i` (panics if `i >= len()`, like a slice).
    pub fn record(&self, i: usize) -> Record<'a> {
        let r = &self.meta.recs[i];
        Record {
            subject: self.meta.subject(self.buf, r),
            id: r.id,
            bytes: &self.buf[r.start..r.end],
            size: r.size,
        }
    }

    pub fn records(&self) -> impl ExactSizeIterator<Item = Record<'a>> + '_ {
        (0..self.len()).map(|i| self.record(i))
    }

    /// The batch's distinct subjects, in order of first appearance.
    pub fn distinct(&self) -> impl ExactSizeIterator<Item = &'a str> + '_ {
        let meta = self.meta;
        let buf = self.buf;
        meta.distinct.iter().map(move |&i| {
            meta.subject(buf, &meta.recs[i as usize])
                .unwrap_or_default()
        })
    }

    /// The distinct subjects as owned strings, to hold across a consent lookup.
    pub fn distinct_subjects(&self) -> Vec<CompactString> {
        self.distinct().map(CompactString::from).collect()
    }

    /// Record bytes buffered for the batch.
    pub fn data_bytes(&self) -> usize {
        self.meta.data_bytes
    }

    /// Verdicts per record from verdicts per distinct subject (`per_subject[i]` for
    /// `distinct()[i]`): a record without a subject is dropped for its own reason, or with
    /// `audit` kept as a would-drop; with `audit`, a subject's `Drop` becomes `KeepAudit`.
    pub fn verdicts_by_subject(
        &self,
        per_subject: &[Verdict],
        audit: bool,
        out: &mut Vec<Verdict>,
    ) {
        out.clear();
        out.extend(self.meta.recs.iter().map(|r| {
            let v = match r.slot {
                Slot::Missing(reason) => Verdict::Drop(reason),
                // A subject beyond `per_subject` (a caller's mistake) fails closed.
                _ => per_subject
                    .get(r.id as usize)
                    .copied()
                    .unwrap_or(Verdict::Drop(Reason::UNPARSABLE)),
            };
            match (v, audit) {
                (Verdict::Drop(reason), true) => Verdict::KeepAudit(reason),
                (v, _) => v,
            }
        }));
    }
}

impl fmt::Debug for Batch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.records()).finish()
    }
}
