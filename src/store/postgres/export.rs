//! PostgreSQL exports through `COPY (SELECT …) TO STDOUT (FORMAT binary)`.
//!
//! Why COPY: rows arrive as one byte stream with no per-row protocol round
//! of sqlx (row description lookups, a decoded value per column); the binary
//! format is what the server sends cheapest (no text conversion of integers
//! and instants) and each field is read in place. The CSV text is made in
//! Rust by [`crate::export::format`], the same code as for SQLite, because the
//! file format (metadata as compact JSON with sorted keys, instants with only
//! the fractional digits needed) is not what the server's text output gives.
//!
//! COPY takes no bind parameters, so the filter goes into the statement as
//! literals: dates and instants we format ourselves, names as escaped strings.

use std::cmp::Ordering;

use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use futures_util::TryStreamExt;
use sqlx::PgPool;
use sqlx::pool::PoolConnection;

use crate::domain::Catalog;
use crate::domain::period::{Granularity, start_of};
use crate::export::format::{EntryFields, RowFormatter, TotalFields};
use crate::store::{
    AscendingKeys, Chunk, CsvSink, ExportFilter, StoreError, StreamError, TailTotal, add_tail, total_past_64_bits,
    totals_sql,
};

/// The entries export (see [`crate::store::Store::export_entries`]).
pub(super) async fn entries(
    pool: &PgPool,
    catalog: &Catalog,
    filter: &ExportFilter,
    sink: &mut dyn CsvSink,
) -> Result<u64, StreamError> {
    let mut conditions = vec![
        format!("occurred_at >= {}", instant(start_of(filter.from))),
        format!("occurred_at < {}", instant(start_of(filter.to))),
    ];
    conditions.extend(name_conditions(filter));
    if let Some(as_of) = filter.as_of {
        conditions.push(format!("recorded_at <= {}", instant(as_of)));
    }
    let sql = format!(
        "COPY (SELECT id, account, resource, amount, occurred_at, recorded_at, idempotency_key, source, reverses, metadata
               FROM entries WHERE {} ORDER BY id) TO STDOUT (FORMAT binary)",
        conditions.join(" AND ")
    );
    let mut conn = pool.acquire().await?;
    let result = copy_entries(&mut conn, &sql, catalog, sink).await;
    if result.is_err() {
        // A COPY abandoned halfway leaves the connection mid-protocol.
        conn.close_on_drop();
    }
    result
}

async fn copy_entries(
    conn: &mut PoolConnection<sqlx::Postgres>,
    sql: &str,
    catalog: &Catalog,
    sink: &mut dyn CsvSink,
) -> Result<u64, StreamError> {
    let mut format = RowFormatter::new(catalog);
    let mut chunk = Chunk::new();
    let mut reader = BinaryCopy::default();
    let mut copy = conn.copy_out_raw(sql).await?;
    while let Some(bytes) = copy.try_next().await? {
        reader.push(&bytes);
        while let Some(tuple) = reader.next_tuple(10)? {
            let f = |i| reader.field(&tuple, i);
            let entry = EntryFields {
                id: int8(f(0))?,
                account: required(f(1))?,
                resource: required(f(2))?,
                amount: int8(f(3))?,
                occurred_at: timestamptz(f(4))?,
                recorded_at: timestamptz(f(5))?,
                idempotency_key: required(f(6))?,
                source: f(7),
                reverses: f(8).map(|v| int8(Some(v))).transpose()?,
                metadata: f(9).map(jsonb).transpose()?,
            };
            format.entry(&mut chunk.bytes, &entry)?;
            if chunk.line_done() {
                chunk.flush(sink)?;
            }
        }
    }
    reader.finish()?;
    chunk.flush(sink)?;
    Ok(chunk.total_rows)
}

/// The table, bucket column and bucket-of-an-entry expression of a granularity.
pub(super) fn shape(granularity: Granularity) -> (&'static str, &'static str, &'static str) {
    match granularity {
        Granularity::Day => ("daily_totals", "day", "(e.occurred_at AT TIME ZONE 'UTC')::date"),
        Granularity::Month => (
            "monthly_totals",
            "month",
            "date_trunc('month', e.occurred_at AT TIME ZONE 'UTC')::date",
        ),
    }
}

/// The totals export (see [`crate::store::Store::export_totals`]).
pub(super) async fn totals(
    pool: &PgPool,
    catalog: &Catalog,
    granularity: Granularity,
    filter: &ExportFilter,
    sink: &mut dyn CsvSink,
) -> Result<u64, StreamError> {
    if filter.as_of.is_some() {
        return totals_as_of(pool, catalog, granularity, filter, sink).await;
    }
    // The folded totals (COPY on one connection) and the tail (a query on a
    // second) are read in one snapshot: the first transaction exports it and
    // the second adopts it before its first statement.
    let mut folded_conn = pool.acquire().await?;
    let mut tail_conn = pool.acquire().await?;
    let result = async {
        let begin = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY";
        sqlx::query(begin).execute(&mut *folded_conn).await?;
        let snapshot: String = sqlx::query_scalar("SELECT pg_export_snapshot()")
            .fetch_one(&mut *folded_conn)
            .await?;
        sqlx::query(begin).execute(&mut *tail_conn).await?;
        sqlx::query(&format!("SET TRANSACTION SNAPSHOT {}", text_literal(&snapshot)))
            .execute(&mut *tail_conn)
            .await?;
        let rows = merge_folded_and_tail(&mut folded_conn, &mut tail_conn, catalog, granularity, filter, sink).await?;
        sqlx::query("COMMIT").execute(&mut *tail_conn).await?;
        sqlx::query("COMMIT").execute(&mut *folded_conn).await?;
        Ok(rows)
    }
    .await;
    if result.is_err() {
        // Mid-COPY or mid-transaction: not fit to go back to the pool.
        folded_conn.close_on_drop();
        tail_conn.close_on_drop();
    }
    result
}

/// The folded totals in key order (an index range scan, no sort, no
/// aggregate: the `GROUP BY` of folded UNION ALL tail used to aggregate and
/// sort every total, spilling to disk) with the unfolded tail, grouped and
/// sorted the same way, merged in: a tail total with the key of a folded one
/// is added to it.
async fn merge_folded_and_tail(
    folded_conn: &mut PoolConnection<sqlx::Postgres>,
    tail_conn: &mut PoolConnection<sqlx::Postgres>,
    catalog: &Catalog,
    granularity: Granularity,
    filter: &ExportFilter,
    sink: &mut dyn CsvSink,
) -> Result<u64, StreamError> {
    let (table, bucket, bucket_of_entry) = shape(granularity);
    let tail_sql = totals_sql(
        include_str!("../sql/postgres/export_totals_tail.sql"),
        table,
        bucket,
        bucket_of_entry,
    );
    let mut tail_rows = sqlx::query_as::<_, (String, String, NaiveDate, String, i64)>(&tail_sql)
        .bind(start_of(filter.from))
        .bind(start_of(filter.to))
        .bind(filter.account.as_ref().map(|a| a.as_str()))
        .bind(filter.resource.as_ref().map(|r| r.as_str()))
        .fetch(&mut **tail_conn)
        .map_err(StreamError::from)
        .and_then(|(account, resource, bucket, amount, entries)| {
            // Past 128 bits would take 2^64 entries of the largest amount.
            let amount = amount
                .parse::<i128>()
                .map_err(|_| StreamError::Store(total_past_64_bits(&account, &resource, bucket)));
            std::future::ready(amount.map(|amount| TailTotal {
                account,
                resource,
                bucket,
                amount,
                entries,
            }))
        });
    let mut tail = tail_rows.try_next().await?;

    let mut conditions = vec![
        format!("{bucket} >= {}", date_literal(filter.from)),
        format!("{bucket} < {}", date_literal(filter.to)),
    ];
    conditions.extend(name_conditions(filter));
    // The merge needs byte order. Under a C collation that is the primary
    // key's order, so the plain ORDER BY is an index range scan; spelling out
    // COLLATE "C" there would make the planner sort every total instead (an
    // index only serves its own collation). Other collations get the sort.
    // Since PostgreSQL 15 an ICU database can show datcollate 'C' and still
    // sort by ICU rules: only the libc provider ('c') counts.
    let bytewise: bool = sqlx::query_scalar(
        "SELECT datcollate IN ('C', 'POSIX')
                AND (current_setting('server_version_num')::int < 150000
                     OR (to_jsonb(d) ->> 'datlocprovider') = 'c')
         FROM pg_database AS d WHERE datname = current_database()",
    )
    .fetch_one(&mut **folded_conn)
    .await?;
    let collate = if bytewise { "" } else { " COLLATE \"C\"" };
    let folded_sql = format!(
        "COPY (SELECT account, resource, {bucket}, amount::bigint, entries FROM {table} WHERE {}
               ORDER BY account{collate}, resource{collate}, {bucket}) TO STDOUT (FORMAT binary)",
        conditions.join(" AND ")
    );
    let mut format = RowFormatter::new(catalog);
    let mut chunk = Chunk::new();
    let mut reader = BinaryCopy::default();
    let mut order = AscendingKeys::default();
    let mut copy = folded_conn.copy_out_raw(&folded_sql).await?;
    while let Some(bytes) = copy.try_next().await? {
        reader.push(&bytes);
        while let Some(tuple) = reader.next_tuple(5)? {
            let mut folded = total_fields(&reader, &tuple)?;
            order.advance(folded.account, folded.resource, folded.bucket)?;
            while let Some(t) = &tail {
                match t.cmp_key(folded.account, folded.resource, folded.bucket) {
                    Ordering::Less => {
                        format.total(&mut chunk.bytes, granularity, &t.fields()?);
                        if chunk.line_done() {
                            chunk.flush(sink)?;
                        }
                    }
                    Ordering::Equal => folded = add_tail(folded, t)?,
                    Ordering::Greater => break,
                }
                tail = tail_rows.try_next().await?;
            }
            format.total(&mut chunk.bytes, granularity, &folded);
            if chunk.line_done() {
                chunk.flush(sink)?;
            }
        }
    }
    reader.finish()?;
    drop(copy);
    while let Some(t) = &tail {
        format.total(&mut chunk.bytes, granularity, &t.fields()?);
        if chunk.line_done() {
            chunk.flush(sink)?;
        }
        tail = tail_rows.try_next().await?;
    }
    chunk.flush(sink)?;
    Ok(chunk.total_rows)
}

/// A total's sum, which the SQL gives as text (exact past 64 bits), in
/// 64-bit minor units, or the overflow naming the total.
pub(crate) fn total_minor_units(
    amount: &str,
    account: &str,
    resource: &str,
    bucket: NaiveDate,
) -> Result<i64, StoreError> {
    amount
        .parse::<i64>()
        .map_err(|_| total_past_64_bits(account, resource, bucket))
}

/// Totals as of a recorded time: one aggregate over the ledger (nothing to
/// merge), read as ordinary rows.
async fn totals_as_of(
    pool: &PgPool,
    catalog: &Catalog,
    granularity: Granularity,
    filter: &ExportFilter,
    sink: &mut dyn CsvSink,
) -> Result<u64, StreamError> {
    let (table, bucket, bucket_of_entry) = shape(granularity);
    let sql = totals_sql(
        include_str!("../sql/postgres/export_totals_as_of.sql"),
        table,
        bucket,
        bucket_of_entry,
    );
    let mut rows = sqlx::query_as::<_, (String, String, NaiveDate, String, i64)>(&sql)
        .bind(filter.from)
        .bind(filter.to)
        .bind(filter.account.as_ref().map(|a| a.as_str()))
        .bind(filter.resource.as_ref().map(|r| r.as_str()))
        .bind(start_of(filter.from))
        .bind(start_of(filter.to))
        .bind(filter.as_of)
        .fetch(pool);
    let mut format = RowFormatter::new(catalog);
    let mut chunk = Chunk::new();
    while let Some((account, resource, bucket, amount, entries)) = rows.try_next().await? {
        let amount = total_minor_units(&amount, &account, &resource, bucket)?;
        let total = TotalFields {
            account: account.as_bytes(),
            resource: resource.as_bytes(),
            bucket,
            amount,
            entries,
        };
        format.total(&mut chunk.bytes, granularity, &total);
        if chunk.line_done() {
            chunk.flush(sink)?;
        }
    }
    chunk.flush(sink)?;
    Ok(chunk.total_rows)
}

/// `account = …` / `resource = …` for the filter's optional names.
fn name_conditions(filter: &ExportFilter) -> Vec<String> {
    let mut conditions = Vec::new();
    if let Some(account) = &filter.account {
        conditions.push(format!("account = {}", text_literal(account.as_str())));
    }
    if let Some(resource) = &filter.resource {
        conditions.push(format!("resource = {}", text_literal(resource.as_str())));
    }
    conditions
}

/// A string literal whatever `standard_conforming_strings` and
/// `backslash_quote` say (`E'…'`, backslashes escaped, quotes doubled).
fn text_literal(text: &str) -> String {
    format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
}

fn instant(t: DateTime<Utc>) -> String {
    format!("'{}'::timestamptz", t.to_rfc3339_opts(SecondsFormat::Micros, true))
}

fn date_literal(d: NaiveDate) -> String {
    format!("'{}'::date", d.format("%Y-%m-%d"))
}

/// The fields of one tuple: (start, length) in the reader's buffer, length
/// −1 for NULL.
struct Tuple {
    fields: [(usize, i32); 10],
}

/// Reads `COPY … (FORMAT binary)` output: a signature and header, then per
/// tuple a 16-bit field count and per field a 32-bit length (−1: NULL) and the
/// value in the type's binary form; a count of −1 ends the data. Chunks need
/// not end on tuple boundaries.
#[derive(Default)]
struct BinaryCopy {
    buf: Vec<u8>,
    pos: usize,
    header_seen: bool,
    ended: bool,
}

const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

impl BinaryCopy {
    /// Appends a chunk (after dropping what was read).
    fn push(&mut self, bytes: &[u8]) {
        self.buf.drain(..self.pos);
        self.pos = 0;
        self.buf.extend_from_slice(bytes);
    }

    fn available(&self, at: usize, len: usize) -> Option<&[u8]> {
        self.buf.get(at..at.checked_add(len)?)
    }

    /// The next complete tuple, which must have `width` fields; None when more
    /// bytes are needed (or the data ended).
    fn next_tuple(&mut self, width: usize) -> Result<Option<Tuple>, StreamError> {
        if !self.header_seen {
            let Some(fixed) = self.available(0, SIGNATURE.len() + 8) else {
                return Ok(None);
            };
            if &fixed[..SIGNATURE.len()] != SIGNATURE {
                return Err(malformed("no COPY signature"));
            }
            let extension = be_u32(&fixed[SIGNATURE.len() + 4..]) as usize;
            if self.available(0, SIGNATURE.len() + 8 + extension).is_none() {
                return Ok(None);
            }
            self.pos = SIGNATURE.len() + 8 + extension;
            self.header_seen = true;
        }
        if self.ended {
            return Ok(None);
        }
        let Some(count) = self.available(self.pos, 2) else {
            return Ok(None);
        };
        let count = i16::from_be_bytes([count[0], count[1]]);
        if count == -1 {
            self.ended = true;
            self.pos += 2;
            return Ok(None);
        }
        if usize::try_from(count).ok() != Some(width) || width > 10 {
            return Err(malformed("unexpected field count"));
        }
        let mut tuple = Tuple { fields: [(0, -1); 10] };
        let mut at = self.pos + 2;
        for field in tuple.fields.iter_mut().take(width) {
            let Some(len) = self.available(at, 4) else {
                return Ok(None);
            };
            let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
            at += 4;
            if len >= 0 {
                if self.available(at, len as usize).is_none() {
                    return Ok(None);
                }
                *field = (at, len);
                at += len as usize;
            } else {
                *field = (at, -1);
            }
        }
        self.pos = at;
        Ok(Some(tuple))
    }

    fn field(&self, tuple: &Tuple, index: usize) -> Option<&[u8]> {
        let (start, len) = tuple.fields[index];
        (len >= 0).then(|| &self.buf[start..start + len as usize])
    }

    /// Checks that the data ended properly.
    fn finish(&self) -> Result<(), StreamError> {
        if self.ended && self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(malformed("truncated"))
        }
    }
}

fn malformed(what: &str) -> StreamError {
    StreamError::Data(format!("malformed COPY data from the server ({what})"))
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

fn required(value: Option<&[u8]>) -> Result<&[u8], StreamError> {
    value.ok_or_else(|| malformed("NULL in a NOT NULL column"))
}

fn int8(value: Option<&[u8]>) -> Result<i64, StreamError> {
    let bytes: [u8; 8] = required(value)?.try_into().map_err(|_| malformed("bigint"))?;
    Ok(i64::from_be_bytes(bytes))
}

/// µs since 2000-01-01 (PostgreSQL's epoch) to µs since 1970-01-01.
fn timestamptz(value: Option<&[u8]>) -> Result<i64, StreamError> {
    const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;
    int8(value)?
        .checked_add(POSTGRES_EPOCH_MICROS)
        .ok_or_else(|| StreamError::Data("a stored timestamp is out of range".into()))
}

/// Days since 2000-01-01.
fn date(value: Option<&[u8]>) -> Result<NaiveDate, StreamError> {
    const DAYS_FROM_CE_TO_2000: i32 = 730_120;
    let bytes: [u8; 4] = required(value)?.try_into().map_err(|_| malformed("date"))?;
    i32::from_be_bytes(bytes)
        .checked_add(DAYS_FROM_CE_TO_2000)
        .and_then(NaiveDate::from_num_days_from_ce_opt)
        .ok_or_else(|| StreamError::Data("a stored date is out of range".into()))
}

/// jsonb's binary form: a version byte (1), then the JSON text.
fn jsonb(value: &[u8]) -> Result<&[u8], StreamError> {
    match value.split_first() {
        Some((1, text)) => Ok(text),
        _ => Err(malformed("jsonb version")),
    }
}

fn total_fields<'r>(reader: &'r BinaryCopy, tuple: &Tuple) -> Result<TotalFields<'r>, StreamError> {
    Ok(TotalFields {
        account: required(reader.field(tuple, 0))?,
        resource: required(reader.field(tuple, 1))?,
        bucket: date(reader.field(tuple, 2))?,
        amount: int8(reader.field(tuple, 3))?,
        entries: int8(reader.field(tuple, 4))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_dates_count_from_2000() {
        assert_eq!(
            date(Some(&0i32.to_be_bytes())).unwrap(),
            NaiveDate::from_ymd_opt(2000, 1, 1).unwrap()
        );
        assert_eq!(
            date(Some(&(-1i32).to_be_bytes())).unwrap(),
            NaiveDate::from_ymd_opt(1999, 12, 31).unwrap()
        );
    }

    #[test]
    fn literals_cannot_end_early() {
        assert_eq!(text_literal(r"a'b\c"), r"E'a''b\\c'");
    }
}
