//! Exports of the ledger and its totals.

use super::{CsvOutput, ExportError};
use crate::domain::period::Granularity;
use crate::store::{ExportFilter, Store};

/// Header of an entries export (API.md).
pub const ENTRIES_HEADER: [&str; 10] = [
    "id",
    "account",
    "resource",
    "amount",
    "occurred_at",
    "recorded_at",
    "idempotency_key",
    "source",
    "reverses",
    "metadata",
];
/// Header of a daily export.
pub const DAILY_HEADER: [&str; 5] = ["account", "resource", "day", "amount", "entries"];
/// Header of a monthly export.
pub const MONTHLY_HEADER: [&str; 5] = ["account", "resource", "month", "amount", "entries"];

/// Writes every entry the filter selects, ascending id. Returns the row count.
pub async fn export_entries(store: &dyn Store, filter: &ExportFilter, out: &mut CsvOutput) -> Result<u64, ExportError> {
    out.header(&ENTRIES_HEADER)?;
    store.export_entries(filter, out).await?;
    Ok(out.rows())
}

/// Writes daily or monthly totals (folded plus unfolded, or as of a recorded
/// time), ascending by account, resource and bucket. Returns the row count.
pub async fn export_totals(
    store: &dyn Store,
    granularity: Granularity,
    filter: &ExportFilter,
    out: &mut CsvOutput,
) -> Result<u64, ExportError> {
    out.header(match granularity {
        Granularity::Day => &DAILY_HEADER,
        Granularity::Month => &MONTHLY_HEADER,
    })?;
    store.export_totals(granularity, filter, out).await?;
    Ok(out.rows())
}
