//! Exports of the ledger and its totals.

use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::TryStreamExt;

use super::CsvOutput;
use crate::domain::period::Granularity;
use crate::domain::{Amount, Catalog, Entry};
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

/// An instant as exports write it: RFC 3339, UTC, `Z`, only the fractional digits needed.
pub fn timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Writes every entry the filter selects, ascending id. Returns the row count.
pub async fn export_entries(store: &dyn Store, filter: &ExportFilter, out: &mut CsvOutput) -> anyhow::Result<u64> {
    out.header(&ENTRIES_HEADER)?;
    let mut rows = store.stream_entries(filter);
    while let Some(entry) = rows.try_next().await? {
        out.row(entry_record(&entry))?;
    }
    Ok(out.rows())
}

/// One entry as CSV fields.
pub fn entry_record(entry: &Entry) -> [String; 10] {
    [
        entry.id.to_string(),
        entry.account.to_string(),
        entry.resource.to_string(),
        entry.amount.to_string(),
        timestamp(entry.occurred_at),
        timestamp(entry.recorded_at),
        entry.idempotency_key.to_string(),
        entry.source.clone().unwrap_or_default(),
        entry.reverses.map(|id| id.to_string()).unwrap_or_default(),
        entry.metadata.as_ref().map(|m| m.to_string()).unwrap_or_default(),
    ]
}

/// Writes daily or monthly totals (folded plus unfolded, or as of a recorded
/// time), ascending by account, resource and bucket. Returns the row count.
pub async fn export_totals(
    store: &dyn Store,
    catalog: &Catalog,
    granularity: Granularity,
    filter: &ExportFilter,
    out: &mut CsvOutput,
) -> anyhow::Result<u64> {
    out.header(match granularity {
        Granularity::Day => &DAILY_HEADER,
        Granularity::Month => &MONTHLY_HEADER,
    })?;
    let mut rows = store.stream_totals(granularity, filter);
    while let Some(total) = rows.try_next().await? {
        let bucket = match granularity {
            Granularity::Day => total.bucket.format("%Y-%m-%d").to_string(),
            Granularity::Month => total.bucket.format("%Y-%m").to_string(),
        };
        let amount = Amount::from_minor(total.amount, catalog.decimals(&total.resource));
        out.row([
            total.account,
            total.resource,
            bucket,
            amount.to_string(),
            total.entries.to_string(),
        ])?;
    }
    Ok(out.rows())
}
