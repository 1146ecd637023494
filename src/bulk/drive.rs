//! Running a whole object through a filter synchronously, for callers that decide without
//! waiting (`explain --body`, policy tests, benchmarks, the fuzz entry point). The proxy
//! drives the filters itself, awaiting consent lookups between `next_batch` and `emit`.

use super::BulkError;
use super::batch::{Batch, Emitted, Verdict};
use super::parquet::ParquetFilter;
use super::stream::StreamFilter;
use bytes::Bytes;
use parquet::file::reader::ChunkReader;

/// Pushes every chunk through `filter`, asks `decide` for each batch's verdicts (one per
/// record, pushed onto the cleared vector), and hands every batch's output, then the
/// closing bytes, to `sink`.
pub fn run_stream<I, D, S>(
    filter: &mut StreamFilter,
    chunks: I,
    mut decide: D,
    mut sink: S,
) -> Result<(), BulkError>
where
    I: IntoIterator<Item = Bytes>,
    D: FnMut(Batch<'_>, &mut Vec<Verdict>),
    S: FnMut(Emitted),
{
    let mut verdicts = Vec::new();
    let mut drain = |filter: &mut StreamFilter| -> Result<(), BulkError> {
        while let Some(batch) = filter.next_batch()? {
            verdicts.clear();
            decide(batch, &mut verdicts);
            sink(filter.emit(&verdicts)?);
        }
        Ok(())
    };
    for chunk in chunks {
        filter.push(chunk);
        drain(filter)?;
    }
    filter.finish();
    drain(filter)?;
    let last = filter.close()?;
    sink(last);
    Ok(())
}

/// The same for a spooled Parquet object.
pub fn run_parquet<R, D, S>(
    filter: &mut ParquetFilter<R>,
    mut decide: D,
    mut sink: S,
) -> Result<(), BulkError>
where
    R: ChunkReader + 'static,
    D: FnMut(Batch<'_>, &mut Vec<Verdict>),
    S: FnMut(Emitted),
{
    let mut verdicts = Vec::new();
    while let Some(batch) = filter.next_batch()? {
        verdicts.clear();
        decide(batch, &mut verdicts);
        sink(filter.emit(&verdicts)?);
    }
    sink(filter.close()?);
    Ok(())
}
