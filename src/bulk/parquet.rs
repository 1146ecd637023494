//! Parquet objects filtered one row group at a time. The footer comes last, so the caller
//! spools the object first; each input row group becomes one batch (its rows' subjects, read
//! from the subject column alone), and its kept rows become one output row group, written
//! column by column, levels and values copied as they are, so that nested and repeated
//! columns keep their shape. Memory is one row group's subjects plus one column chunk.

use super::BulkError;
use super::batch::{Batch, BatchMeta, Counts, Emitted, Reason, Rec, Slot, Verdict};
use super::spec::{RecordsSpec, SubjectPath};
use bytes::Bytes;
use parquet::basic::{
    Compression as Codec, ConvertedType, GzipLevel, LogicalType, Type as Physical,
};
use parquet::column::reader::{ColumnReader, ColumnReaderImpl};
use parquet::column::writer::{ColumnWriter, ColumnWriterImpl};
use parquet::data_type::{ByteArray, DataType, FixedLenByteArray};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{ChunkReader, FileReader, RowGroupReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::types::ColumnDescriptor;
use std::fmt::Write as _;
use std::sync::Arc;

/// Records read per call while copying a column.
const CHUNK: usize = 8192;

/// Filters a spooled Parquet object: [`next_batch`](Self::next_batch) gives one input row
/// group's rows, [`emit`](Self::emit) writes its kept rows as one output row group and hands
/// out the bytes written so far, [`close`](Self::close) writes the footer. An input row
/// group with no row kept is left out.
///
/// The output has the input's schema and key-value metadata, and each column keeps its
/// codec. Snappy, gzip, zstd and uncompressed columns can be read; a file using another
/// codec is refused by `new`, before any byte is sent.
pub struct ParquetFilter<R: ChunkReader + 'static> {
    reader: SerializedFileReader<R>,
    /// The subject column's leaf index; `None` when no usable column has that path.
    subject: Option<usize>,
    next_group: usize,
    /// The row group whose rows are in `batch`, waiting for verdicts.
    current: Option<usize>,
    writer: SerializedFileWriter<Vec<u8>>,
    batch: BatchMeta,
    totals: Counts,
    failed: Option<BulkError>,
    closed: bool,
}

fn perr(e: ParquetError) -> BulkError {
    BulkError::Parquet(e.to_string())
}

impl<R: ChunkReader + 'static> ParquetFilter<R> {
    /// Opens the spooled object (a `std::fs::File`, or `Bytes` in tests) for records of
    /// `spec`.
    pub fn new(input: R, spec: &RecordsSpec) -> Result<ParquetFilter<R>, BulkError> {
        let SubjectPath::ColumnPath(path) = &spec.subject else {
            return Err(BulkError::Misuse(
                "a Parquet filter needs a Parquet column path",
            ));
        };
        let reader = SerializedFileReader::new(input).map_err(perr)?;
        let meta = reader.metadata();
        let schema = meta.file_metadata().schema_descr();
        let joined = path.join(".");
        let subject = (0..schema.num_columns())
            .find(|&i| {
                let p = schema.column(i).path().parts().to_vec();
                p.iter().map(String::as_str).eq(path.iter().map(|s| &**s))
            })
            .or_else(|| {
                (0..schema.num_columns()).find(|&i| schema.column(i).path().string() == joined)
            })
            // A column inside a repeated group holds several values per row: no one subject.
            .filter(|&i| schema.column(i).max_rep_level() == 0);

        let mut props = WriterProperties::builder()
            .set_key_value_metadata(meta.file_metadata().key_value_metadata().cloned());
        for (g, group) in meta.row_groups().iter().enumerate() {
            for col in group.columns() {
                let codec = match col.compression() {
                    c @ (Codec::UNCOMPRESSED | Codec::SNAPPY | Codec::ZSTD(_)) => c,
                    // The level is not recorded in the file; write gzip at the fastest.
                    Codec::GZIP(_) => Codec::GZIP(GzipLevel::try_new(1).map_err(perr)?),
                    other => {
                        return Err(BulkError::Parquet(format!(
                            "column {} is compressed with {other}, which the filter cannot read (it reads snappy, gzip, zstd or none)",
                            col.column_path()
                        )));
                    }
                };
                // Each output column keeps the codec of its first input chunk.
                if g == 0 {
                    props = props.set_column_compression(col.column_path().clone(), codec);
                }
            }
        }
        let writer = SerializedFileWriter::new(
            Vec::new(),
            schema.root_schema_ptr(),
            Arc::new(props.build()),
        )
        .map_err(perr)?;
        Ok(ParquetFilter {
            reader,
            subject,
            next_group: 0,
            current: None,
            writer,
            batch: BatchMeta::default(),
            totals: Counts::default(),
            failed: None,
            closed: false,
        })
    }

    /// The rows of the next input row group that has any, or `None` at the end. The same
    /// batch is returned until it is emitted.
    pub fn next_batch(&mut self) -> Result<Option<Batch<'_>>, BulkError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.current.is_none() {
            match self.read_next_group() {
                Ok(true) => {}
                Ok(false) => return Ok(None),
                Err(e) => {
                    self.failed = Some(e.clone());
                    return Err(e);
                }
            }
        }
        Ok(self.current_batch())
    }

    /// The batch waiting for verdicts, if any.
    pub fn current_batch(&self) -> Option<Batch<'_>> {
        self.current.map(|_| Batch {
            meta: &self.batch,
            buf: &[],
        })
    }

    /// Writes the current row group's kept rows as one row group (none if no row is kept)
    /// and returns the output bytes not yet handed out.
    pub fn emit(&mut self, verdicts: &[Verdict]) -> Result<Emitted, BulkError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let Some(group) = self.current else {
            return Err(BulkError::Misuse("emit was called with no batch waiting"));
        };
        if verdicts.len() != self.batch.recs.len() {
            return Err(BulkError::VerdictCount {
                expected: self.batch.recs.len(),
                got: verdicts.len(),
            });
        }
        let result = self.write_group(group, verdicts);
        self.current = None;
        self.batch.clear();
        result.inspect_err(|e| self.failed = Some(e.clone()))
    }

    /// Writes the footer and returns the last bytes.
    pub fn close(&mut self) -> Result<Emitted, BulkError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.closed || self.current.is_some() || self.next_group < self.reader.num_row_groups() {
            return Err(BulkError::Misuse(
                "close was called twice, or before every row group was emitted",
            ));
        }
        self.closed = true;
        let result = self.writer.finish().map_err(perr).map(|_| {
            let bytes = std::mem::take(self.writer.inner_mut());
            let mut counts = Counts::default();
            counts.bytes_out = bytes.len() as u64;
            self.totals.add(&counts);
            Emitted {
                bytes: Bytes::from(bytes),
                counts,
            }
        });
        result.inspect_err(|e| self.failed = Some(e.clone()))
    }

    /// Counts over every emitted row group so far. Rows have no byte size of their own:
    /// `bytes_in` counts the row groups' compressed bytes.
    pub fn totals(&self) -> &Counts {
        &self.totals
    }

    /// Reads the subjects of the next row group with rows. `false` at the end.
    fn read_next_group(&mut self) -> Result<bool, BulkError> {
        while self.next_group < self.reader.num_row_groups() {
            let index = self.next_group;
            self.next_group += 1;
            let group = self.reader.get_row_group(index).map_err(perr)?;
            let rows = group.metadata().num_rows().max(0) as usize;
            if rows == 0 {
                continue;
            }
            self.batch.clear();
            match self.subject {
                Some(col) => read_subjects(&*group, col, rows, &mut self.batch)?,
                None => self
                    .batch
                    .recs
                    .extend((0..rows).map(|_| parquet_rec(Slot::Missing(Reason::NO_SUBJECT)))),
            }
            self.batch.index_subjects(&[]);
            self.current = Some(index);
            return Ok(true);
        }
        Ok(false)
    }

    fn write_group(&mut self, index: usize, verdicts: &[Verdict]) -> Result<Emitted, BulkError> {
        let mut counts = Counts::default();
        let mut keep = Vec::with_capacity(verdicts.len());
        for v in verdicts {
            match *v {
                Verdict::Keep => counts.count_kept(0, None),
                Verdict::KeepAudit(r) => counts.count_kept(0, Some(r)),
                Verdict::Drop(r) => counts.count_dropped(0, r),
            }
            keep.push(!matches!(v, Verdict::Drop(_)));
        }
        let group = self.reader.get_row_group(index).map_err(perr)?;
        counts.bytes_in = group.metadata().compressed_size().max(0) as u64;
        counts.bytes_in_raw = counts.bytes_in;
        if counts.kept > 0 {
            let schema = self.reader.metadata().file_metadata().schema_descr_ptr();
            let mut rg = self.writer.next_row_group().map_err(perr)?;
            let mut col = 0;
            while let Some(mut writer) = rg.next_column().map_err(perr)? {
                let reader = group.get_column_reader(col).map_err(perr)?;
                copy_column(reader, writer.untyped(), &schema.column(col), &keep)?;
                writer.close().map_err(perr)?;
                col += 1;
            }
            rg.close().map_err(perr)?;
        }
        self.writer
            .flush()
            .map_err(|e| BulkError::Parquet(e.to_string()))?;
        let bytes = std::mem::take(self.writer.inner_mut());
        counts.bytes_out = bytes.len() as u64;
        self.totals.add(&counts);
        Ok(Emitted {
            bytes: Bytes::from(bytes),
            counts,
        })
    }
}

fn parquet_rec(slot: Slot) -> Rec {
    Rec {
        start: 0,
        end: 0,
        size: 0,
        slot,
        id: u32::MAX,
    }
}

/// How a subject column's values become subject text.
#[derive(Copy, Clone)]
enum Kind {
    Text,
    Signed,
    Unsigned,
    Uuid,
    /// Floats, booleans, dates, decimals...: not a subject.
    Other,
}

fn kind_of(descr: &ColumnDescriptor) -> Kind {
    let logical = descr.logical_type_ref();
    let converted = descr.converted_type();
    match descr.physical_type() {
        Physical::BYTE_ARRAY => match (logical, converted) {
            (None | Some(LogicalType::String | LogicalType::Enum | LogicalType::Json), _)
                if matches!(
                    converted,
                    ConvertedType::NONE
                        | ConvertedType::UTF8
                        | ConvertedType::ENUM
                        | ConvertedType::JSON
                ) =>
            {
                Kind::Text
            }
            _ => Kind::Other,
        },
        Physical::INT32 | Physical::INT64 => match (logical, converted) {
            (
                Some(LogicalType::Integer {
                    is_signed: false, ..
                }),
                _,
            ) => Kind::Unsigned,
            (
                Some(LogicalType::Integer {
                    is_signed: true, ..
                }),
                _,
            ) => Kind::Signed,
            (
                None,
                ConvertedType::UINT_8
                | ConvertedType::UINT_16
                | ConvertedType::UINT_32
                | ConvertedType::UINT_64,
            ) => Kind::Unsigned,
            (
                None,
                ConvertedType::NONE
                | ConvertedType::INT_8
                | ConvertedType::INT_16
                | ConvertedType::INT_32
                | ConvertedType::INT_64,
            ) => Kind::Signed,
            _ => Kind::Other,
        },
        Physical::FIXED_LEN_BYTE_ARRAY if matches!(logical, Some(LogicalType::Uuid)) => Kind::Uuid,
        _ => Kind::Other,
    }
}

/// Reads one row group's subject column into one record per row.
fn read_subjects(
    group: &dyn RowGroupReader,
    col: usize,
    rows: usize,
    batch: &mut BatchMeta,
) -> Result<(), BulkError> {
    let descr = group.metadata().schema_descr().column(col);
    let kind = kind_of(&descr);
    if let Kind::Other = kind {
        batch
            .recs
            .extend((0..rows).map(|_| parquet_rec(Slot::Missing(Reason::NO_SUBJECT))));
        return Ok(());
    }
    let max_def = descr.max_def_level();
    let reader = group.get_column_reader(col).map_err(perr)?;
    let mut def = Vec::new();
    let bad = || BulkError::Parquet("the subject column's levels and values disagree".into());
    // Reads every row, writing each present value's text to the arena with `$text`.
    macro_rules! read_all {
        ($reader:expr, $text:expr) => {{
            let mut reader = $reader;
            let mut values = Vec::new();
            loop {
                def.clear();
                values.clear();
                let (records, _, levels) = reader
                    .read_records(CHUNK, (max_def > 0).then_some(&mut def), None, &mut values)
                    .map_err(perr)?;
                if records == 0 {
                    break;
                }
                let levels = if max_def == 0 { records } else { levels };
                let mut vi = 0;
                for li in 0..levels {
                    let present = max_def == 0 || *def.get(li).ok_or_else(bad)? == max_def;
                    let slot = if present {
                        let v = values.get(vi).ok_or_else(bad)?;
                        vi += 1;
                        let mark = batch.arena.len();
                        #[allow(clippy::redundant_closure_call)]
                        match ($text)(v, &mut batch.arena) {
                            Ok(()) if batch.arena.len() > mark => {
                                Slot::Arena(mark as u32, (batch.arena.len() - mark) as u32)
                            }
                            Ok(()) => Slot::Missing(Reason::NO_SUBJECT),
                            Err(r) => {
                                batch.arena.truncate(mark);
                                Slot::Missing(r)
                            }
                        }
                    } else {
                        Slot::Missing(Reason::NO_SUBJECT)
                    };
                    batch.recs.push(parquet_rec(slot));
                }
            }
        }};
    }
    match (reader, kind) {
        (ColumnReader::ByteArrayColumnReader(r), Kind::Text) => {
            read_all!(r, |v: &ByteArray, s: &mut String| {
                std::str::from_utf8(v.data())
                    .map(|t| s.push_str(t))
                    .map_err(|_| Reason::UNPARSABLE)
            })
        }
        (ColumnReader::Int32ColumnReader(r), Kind::Signed) => {
            read_all!(r, |v: &i32, s: &mut String| {
                let _ = write!(s, "{v}");
                Ok::<(), Reason>(())
            })
        }
        (ColumnReader::Int32ColumnReader(r), Kind::Unsigned) => {
            read_all!(r, |v: &i32, s: &mut String| {
                let _ = write!(s, "{}", *v as u32);
                Ok::<(), Reason>(())
            })
        }
        (ColumnReader::Int64ColumnReader(r), Kind::Signed) => {
            read_all!(r, |v: &i64, s: &mut String| {
                let _ = write!(s, "{v}");
                Ok::<(), Reason>(())
            })
        }
        (ColumnReader::Int64ColumnReader(r), Kind::Unsigned) => {
            read_all!(r, |v: &i64, s: &mut String| {
                let _ = write!(s, "{}", *v as u64);
                Ok::<(), Reason>(())
            })
        }
        (ColumnReader::FixedLenByteArrayColumnReader(r), Kind::Uuid) => {
            read_all!(r, |v: &FixedLenByteArray, s: &mut String| {
                let b = v.data();
                if b.len() != 16 {
                    return Err(Reason::UNPARSABLE);
                }
                for (i, byte) in b.iter().enumerate() {
                    if matches!(i, 4 | 6 | 8 | 10) {
                        s.push('-');
                    }
                    let _ = write!(s, "{byte:02x}");
                }
                Ok(())
            })
        }
        _ => {
            return Err(BulkError::Parquet(
                "the subject column's type does not match its values".into(),
            ));
        }
    }
    if batch.recs.len() != rows {
        return Err(BulkError::Parquet(format!(
            "the subject column holds {} rows where its row group has {rows}",
            batch.recs.len()
        )));
    }
    Ok(())
}

/// Copies the rows of one column chunk whose `keep` flag is set, levels and values as they
/// are.
fn copy_column(
    reader: ColumnReader,
    writer: &mut ColumnWriter<'_>,
    descr: &ColumnDescriptor,
    keep: &[bool],
) -> Result<(), BulkError> {
    let (max_def, max_rep) = (descr.max_def_level(), descr.max_rep_level());
    macro_rules! pairs {
        ($($r:ident => $w:ident),*) => {
            match (reader, writer) {
                $((ColumnReader::$r(mut r), ColumnWriter::$w(w)) => copy_rows(&mut r, w, max_def, max_rep, keep),)*
                _ => Err(BulkError::Parquet(format!("column {} changed type between reader and writer", descr.path()))),
            }
        };
    }
    pairs!(
        BoolColumnReader => BoolColumnWriter,
        Int32ColumnReader => Int32ColumnWriter,
        Int64ColumnReader => Int64ColumnWriter,
        Int96ColumnReader => Int96ColumnWriter,
        FloatColumnReader => FloatColumnWriter,
        DoubleColumnReader => DoubleColumnWriter,
        ByteArrayColumnReader => ByteArrayColumnWriter,
        FixedLenByteArrayColumnReader => FixedLenByteArrayColumnWriter
    )
}

fn copy_rows<T: DataType>(
    reader: &mut ColumnReaderImpl<T>,
    writer: &mut ColumnWriterImpl<'_, T>,
    max_def: i16,
    max_rep: i16,
    keep: &[bool],
) -> Result<(), BulkError> {
    let (mut def, mut rep, mut values) = (Vec::new(), Vec::new(), Vec::new());
    let (mut kdef, mut krep, mut kvalues) = (Vec::new(), Vec::new(), Vec::new());
    let mut row = 0usize;
    let bad = || BulkError::Parquet("a column's levels and values disagree".into());
    loop {
        def.clear();
        rep.clear();
        values.clear();
        let (records, _, levels) = reader
            .read_records(
                CHUNK,
                (max_def > 0).then_some(&mut def),
                (max_rep > 0).then_some(&mut rep),
                &mut values,
            )
            .map_err(perr)?;
        if records == 0 {
            break;
        }
        if row + records > keep.len() {
            return Err(BulkError::Parquet(
                "a column holds more rows than its row group".into(),
            ));
        }
        kdef.clear();
        krep.clear();
        kvalues.clear();
        let levels = if max_def == 0 && max_rep == 0 {
            records
        } else {
            levels
        };
        let mut vi = 0;
        // The row the current level belongs to (the first level of a read starts a row).
        let mut r = row;
        for li in 0..levels {
            if li > 0 && (max_rep == 0 || *rep.get(li).ok_or_else(bad)? == 0) {
                r += 1;
            }
            let has_value = max_def == 0 || *def.get(li).ok_or_else(bad)? == max_def;
            if *keep.get(r).ok_or_else(bad)? {
                if max_def > 0 {
                    kdef.push(def[li]);
                }
                if max_rep > 0 {
                    krep.push(rep[li]);
                }
                if has_value {
                    kvalues.push(values.get(vi).ok_or_else(bad)?.clone());
                }
            }
            if has_value {
                vi += 1;
            }
        }
        row += records;
        if !krep.is_empty() || !kvalues.is_empty() || !kdef.is_empty() {
            writer
                .write_batch(
                    &kvalues[..],
                    (max_def > 0).then_some(&kdef[..]),
                    (max_rep > 0).then_some(&krep[..]),
                )
                .map_err(perr)?;
        }
    }
    if row != keep.len() {
        return Err(BulkError::Parquet(format!(
            "a column holds {row} rows where its row group has {}",
            keep.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bulk::run_parquet;
    use crate::bulk::spec::Format;
    use parquet::basic::ZstdLevel;
    use parquet::data_type::{ByteArrayType, Int32Type, Int64Type};
    use parquet::file::reader::SerializedFileReader;
    use parquet::schema::parser::parse_message_type;

    const SCHEMA: &str = "
        message spending {
            required group user {
                required binary id (UTF8);
                optional int64 age;
            }
            optional binary merchant (UTF8);
            required int64 amount_cents;
            optional int32 account (UINT_32);
            optional group tags (LIST) {
                repeated group list {
                    optional binary element (UTF8);
                }
            }
        }";

    /// Writes rows `groups[k]` (row numbers) as row group k. Row `i` belongs to subject
    /// `u{i % 4}`; its other fields vary with `i` (nulls, empty and null-holding lists).
    fn write_file(groups: &[std::ops::Range<i64>]) -> Bytes {
        let schema = Arc::new(parse_message_type(SCHEMA).unwrap());
        let props = WriterProperties::builder()
            .set_compression(Codec::SNAPPY)
            .set_column_compression(
                parquet::schema::types::ColumnPath::from("amount_cents"),
                Codec::ZSTD(ZstdLevel::default()),
            )
            .set_key_value_metadata(Some(vec![parquet::file::metadata::KeyValue::new(
                "origin".into(),
                "test".to_string(),
            )]))
            .build();
        let mut w = SerializedFileWriter::new(Vec::new(), schema, Arc::new(props)).unwrap();
        for rows in groups {
            let mut rg = w.next_row_group().unwrap();
            let opt = |keep: &dyn Fn(i64) -> bool| -> (Vec<i64>, Vec<i16>) {
                let present: Vec<i64> = rows.clone().filter(|&i| keep(i)).collect();
                (present, rows.clone().map(|i| keep(i) as i16).collect())
            };
            // user.id
            let mut c = rg.next_column().unwrap().unwrap();
            let ids: Vec<ByteArray> = rows
                .clone()
                .map(|i| ByteArray::from(format!("u{}", i % 4).as_str()))
                .collect();
            c.typed::<ByteArrayType>()
                .write_batch(&ids, None, None)
                .unwrap();
            c.close().unwrap();
            // user.age: null every third row
            let mut c = rg.next_column().unwrap().unwrap();
            let (present, def) = opt(&|i| i % 3 != 0);
            let ages: Vec<i64> = present.iter().map(|i| 20 + i).collect();
            c.typed::<Int64Type>()
                .write_batch(&ages, Some(&def), None)
                .unwrap();
            c.close().unwrap();
            // merchant: null every fifth row
            let mut c = rg.next_column().unwrap().unwrap();
            let (present, def) = opt(&|i| i % 5 != 0);
            let m: Vec<ByteArray> = present
                .iter()
                .map(|i| ByteArray::from(format!("m{i}").as_str()))
                .collect();
            c.typed::<ByteArrayType>()
                .write_batch(&m, Some(&def), None)
                .unwrap();
            c.close().unwrap();
            // amount_cents
            let mut c = rg.next_column().unwrap().unwrap();
            let amounts: Vec<i64> = rows.clone().map(|i| i * 100).collect();
            c.typed::<Int64Type>()
                .write_batch(&amounts, None, None)
                .unwrap();
            c.close().unwrap();
            // account: unsigned, above i32::MAX
            let mut c = rg.next_column().unwrap().unwrap();
            let (present, def) = opt(&|i| i % 2 == 0);
            let acc: Vec<i32> = present
                .iter()
                .map(|&i| (3_000_000_000u32 + i as u32) as i32)
                .collect();
            c.typed::<Int32Type>()
                .write_batch(&acc, Some(&def), None)
                .unwrap();
            c.close().unwrap();
            // tags: null list, empty list, ["a", null], ["x"]
            let mut c = rg.next_column().unwrap().unwrap();
            let (mut vals, mut def, mut rep) = (Vec::new(), Vec::new(), Vec::new());
            for i in rows.clone() {
                match i % 4 {
                    0 | 1 => {
                        def.push((i % 4) as i16);
                        rep.push(0);
                    }
                    2 => {
                        vals.push(ByteArray::from("a"));
                        def.extend([3, 2]);
                        rep.extend([0, 1]);
                    }
                    _ => {
                        vals.push(ByteArray::from(format!("x{i}").as_str()));
                        def.push(3);
                        rep.push(0);
                    }
                }
            }
            c.typed::<ByteArrayType>()
                .write_batch(&vals, Some(&def), Some(&rep))
                .unwrap();
            c.close().unwrap();
            rg.close().unwrap();
        }
        Bytes::from(w.into_inner().unwrap())
    }

    fn rows(file: &Bytes) -> Vec<String> {
        let reader = SerializedFileReader::new(file.clone()).unwrap();
        reader
            .get_row_iter(None)
            .unwrap()
            .map(|r| r.unwrap().to_string())
            .collect()
    }

    fn run(
        file: &Bytes,
        subject: &str,
        keep: impl Fn(Result<&str, Reason>) -> bool,
    ) -> (Bytes, Counts, Vec<Vec<String>>) {
        let spec = RecordsSpec::new(Format::Parquet, subject).unwrap();
        let mut f = ParquetFilter::new(file.clone(), &spec).unwrap();
        let mut out = Vec::new();
        let mut subjects = Vec::new();
        run_parquet(
            &mut f,
            |b, v| {
                subjects.push(b.records().map(|r| format!("{:?}", r.subject())).collect());
                v.extend(b.records().map(|r| match r.subject() {
                    s if keep(s) => Verdict::Keep,
                    Err(reason) => Verdict::Drop(reason),
                    Ok(_) => Verdict::Drop(Reason(7)),
                }))
            },
            |e| out.extend_from_slice(&e.bytes),
        )
        .unwrap();
        (Bytes::from(out), f.totals().clone(), subjects)
    }

    #[test]
    fn keeps_the_consented_rows_of_each_row_group_with_schema_and_codecs() {
        let input = write_file(&[0..4, 4..7, 7..12, 12..13]);
        let all = rows(&input);
        let (out, t, _) = run(&input, "user.id", |s| matches!(s, Ok("u1" | "u3")));
        let want: Vec<String> = (0..13)
            .filter(|i| i % 2 == 1)
            .map(|i| all[i].clone())
            .collect();
        assert_eq!(rows(&out), want);
        // Nested, null, empty and null-holding lists survive as they were.
        assert!(
            all[1].contains("tags: []") && all[3].contains("tags: [\"x3\"]"),
            "{all:?}"
        );
        assert_eq!((t.records, t.kept, t.dropped_for(Reason(7))), (13, 6, 7));

        let reader = SerializedFileReader::new(out.clone()).unwrap();
        let meta = reader.metadata();
        let source = SerializedFileReader::new(input.clone()).unwrap();
        assert_eq!(
            meta.file_metadata().schema(),
            source.metadata().file_metadata().schema()
        );
        // One output row group per input row group with rows kept; the last has none.
        let sizes: Vec<i64> = meta.row_groups().iter().map(|g| g.num_rows()).collect();
        assert_eq!(sizes, [2, 1, 3]);
        let codecs: Vec<String> = meta
            .row_group(0)
            .columns()
            .iter()
            .map(|c| c.compression().to_string())
            .collect();
        assert_eq!(
            codecs,
            [
                "SNAPPY",
                "SNAPPY",
                "SNAPPY",
                "ZSTD(ZstdLevel(1))",
                "SNAPPY",
                "SNAPPY"
            ]
        );
        let kv = meta.file_metadata().key_value_metadata().unwrap();
        assert_eq!(kv[0].key, "origin");
        assert_eq!(t.bytes_out, out.len() as u64);
    }

    #[test]
    fn subjects_from_strings_integers_nulls_and_missing_columns() {
        let input = write_file(&[0..3, 3..6]);
        let (_, _, subjects) = run(&input, "merchant", |_| false);
        assert_eq!(subjects[0][..2], ["Err(Reason(0))", "Ok(\"m1\")"]);
        let (_, _, subjects) = run(&input, "amount_cents", |_| false);
        assert_eq!(subjects[0][..2], ["Ok(\"0\")", "Ok(\"100\")"]);
        let (_, _, subjects) = run(&input, "account", |_| false);
        assert_eq!(subjects[0][..2], ["Ok(\"3000000000\")", "Err(Reason(0))"]);
        let (_, _, subjects) = run(&input, "user.age", |_| false);
        assert_eq!(subjects[0][..2], ["Err(Reason(0))", "Ok(\"21\")"]);
        // Inside a list, not a leaf, or absent: no subject for any row.
        for path in ["tags.list.element", "user", "nope", "user.id.x"] {
            let (out, t, _) = run(&input, path, |s| s.is_ok());
            assert_eq!(t.dropped_for(Reason::NO_SUBJECT), 6, "{path}");
            assert!(rows(&out).is_empty());
        }
    }

    #[test]
    fn audit_mode_keeps_every_row_and_nothing_kept_is_still_a_valid_file() {
        let input = write_file(&[0..5, 5..9]);
        let (out, t, _) = run(&input, "user.id", |_| true);
        assert_eq!(rows(&out), rows(&input));
        assert_eq!(t.kept, 9);
        let (out, t, _) = run(&input, "user.id", |_| false);
        assert!(rows(&out).is_empty());
        assert_eq!(t.dropped, 9);
        let reader = SerializedFileReader::new(out).unwrap();
        assert_eq!(reader.metadata().num_row_groups(), 0);
    }

    #[test]
    fn bytes_come_out_after_each_row_group() {
        let input = write_file(&[0..4, 4..8, 8..12]);
        let spec = RecordsSpec::new(Format::Parquet, "user.id").unwrap();
        let mut f = ParquetFilter::new(input.clone(), &spec).unwrap();
        let mut sizes = Vec::new();
        while let Some(b) = f.next_batch().unwrap() {
            assert_eq!(b.len(), 4);
            assert_eq!(b.distinct_subjects(), ["u0", "u1", "u2", "u3"]);
            let v = vec![Verdict::Keep; 4];
            sizes.push(f.emit(&v).unwrap().bytes.len());
        }
        assert!(sizes.iter().all(|&n| n > 0), "{sizes:?}");
        let tail = f.close().unwrap();
        assert!(tail.bytes.ends_with(b"PAR1"));
        assert!(matches!(f.close(), Err(BulkError::Misuse(_))));
    }

    #[test]
    fn not_parquet_is_an_error_before_any_byte() {
        let spec = RecordsSpec::new(Format::Parquet, "user.id").unwrap();
        let err = ParquetFilter::new(Bytes::from_static(b"{\"not\":\"parquet\"}"), &spec)
            .err()
            .unwrap();
        assert!(matches!(err, BulkError::Parquet(_)), "{err}");
    }
}
