//! SQLite exports, read through a synchronous connection on a blocking thread.
//!
//! Why not sqlx here: its SQLite driver steps the statement on a worker thread
//! and hands every row to the async side over a channel, which costs a thread
//! wake-up and a copy of every value per row, several times SQLite's own work.
//! Here one thread steps the statement and formats each row from borrowed
//! values; only 64 KiB chunks of finished CSV lines cross to the async side,
//! through a channel of two, so memory stays flat.

use std::cmp::Ordering;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, Row, params};
use tokio::sync::mpsc;

use super::{bucketed_sql, shape, to_micros};
use crate::domain::Catalog;
use crate::domain::period::{Granularity, start_of};
use crate::export::format::{EntryFields, RowFormatter, TotalFields};
use crate::store::{AscendingKeys, Chunk, CsvSink, ExportFilter, StreamError, TailTotal, export_amount};

/// The database file the exports open (beside sqlx's pools).
pub(crate) enum Source {
    /// A file.
    File(PathBuf),
    /// The store's shared-cache in-memory database (its URI).
    Memory(String),
}

impl Source {
    fn open(&self) -> rusqlite::Result<Connection> {
        let conn = match self {
            Source::File(path) => {
                Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?
            }
            Source::Memory(uri) => Connection::open_with_flags(
                uri,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_URI | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )?,
        };
        conn.busy_timeout(Duration::from_secs(10))?;
        Ok(conn)
    }
}

/// Finished lines on the blocking thread, sent on when a chunk is full.
struct Lines {
    chunk: Chunk,
    tx: mpsc::Sender<Chunk>,
}

impl Lines {
    fn line_done(&mut self) -> Result<(), StreamError> {
        if self.chunk.line_done() {
            self.send()?;
        }
        Ok(())
    }

    fn send(&mut self) -> Result<(), StreamError> {
        let full = std::mem::replace(&mut self.chunk, Chunk::new());
        // Fails only when the async side stopped (its error is the one reported).
        self.tx
            .blocking_send(full)
            .map_err(|_| StreamError::Data("the export was abandoned".into()))
    }
}

/// Runs `job` on a blocking thread with its own connection and copies the
/// lines it produces into `sink`. Returns the row count.
async fn run<F>(source: &Arc<Source>, sink: &mut dyn CsvSink, job: F) -> Result<u64, StreamError>
where
    F: FnOnce(&Connection, &mut Lines) -> Result<(), StreamError> + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel(2);
    let source = Arc::clone(source);
    let worker = tokio::task::spawn_blocking(move || {
        let conn = source.open()?;
        let mut lines = Lines {
            chunk: Chunk::new(),
            tx,
        };
        job(&conn, &mut lines)?;
        lines.send()
    });
    let mut rows = 0;
    while let Some(chunk) = rx.recv().await {
        if chunk.rows > 0 {
            sink.write_lines(&chunk.bytes, chunk.rows).map_err(StreamError::Write)?;
            rows += chunk.rows;
        }
    }
    worker
        .await
        .map_err(|e| StreamError::Data(format!("the export thread failed: {e}")))??;
    Ok(rows)
}

const ENTRIES_SQL: &str = "SELECT id, account, resource, amount, occurred_at, recorded_at, idempotency_key,
       source, reverses, metadata
FROM entries
WHERE occurred_at >= ?1 AND occurred_at < ?2
  AND (?3 IS NULL OR account = ?3) AND (?4 IS NULL OR resource = ?4)
  AND (?5 IS NULL OR recorded_at <= ?5)
ORDER BY id";

/// The entries export (see [`crate::store::Store::export_entries`]).
pub(super) async fn entries(
    source: &Arc<Source>,
    catalog: &Arc<Catalog>,
    filter: &ExportFilter,
    sink: &mut dyn CsvSink,
) -> Result<u64, StreamError> {
    let catalog = Arc::clone(catalog);
    let filter = filter.clone();
    run(source, sink, move |conn, lines| {
        let mut format = RowFormatter::new(&catalog);
        let mut statement = conn.prepare(ENTRIES_SQL)?;
        let mut rows = statement.query(params![
            to_micros(start_of(filter.from)),
            to_micros(start_of(filter.to)),
            filter.account.as_ref().map(|a| a.as_str()),
            filter.resource.as_ref().map(|r| r.as_str()),
            filter.as_of.map(to_micros),
        ])?;
        while let Some(row) = rows.next()? {
            let entry = EntryFields {
                id: integer(row, 0)?,
                account: text(row, 1)?,
                resource: text(row, 2)?,
                amount: integer(row, 3)?,
                occurred_at: integer(row, 4)?,
                recorded_at: integer(row, 5)?,
                idempotency_key: text(row, 6)?,
                source: optional_text(row, 7)?,
                reverses: optional_integer(row, 8)?,
                metadata: optional_text(row, 9)?,
            };
            format.entry(&mut lines.chunk.bytes, &entry)?;
            lines.line_done()?;
        }
        Ok(())
    })
    .await
}

/// The totals export (see [`crate::store::Store::export_totals`]).
pub(super) async fn totals(
    source: &Arc<Source>,
    catalog: &Arc<Catalog>,
    granularity: Granularity,
    filter: &ExportFilter,
    sink: &mut dyn CsvSink,
) -> Result<u64, StreamError> {
    let catalog = Arc::clone(catalog);
    let filter = filter.clone();
    run(source, sink, move |conn, lines| {
        let mut format = RowFormatter::new(&catalog);
        if let Some(as_of) = filter.as_of {
            let sql = bucketed_sql(include_str!("../sql/sqlite/export_totals_as_of.sql"), granularity);
            let mut statement = conn.prepare(&sql)?;
            let mut rows = statement.query(params![
                filter.from.to_string(),
                filter.to.to_string(),
                filter.account.as_ref().map(|a| a.as_str()),
                filter.resource.as_ref().map(|r| r.as_str()),
                to_micros(start_of(filter.from)),
                to_micros(start_of(filter.to)),
                to_micros(as_of),
            ])?;
            while let Some(row) = rows.next()? {
                let total = summed_total(row)?;
                format.total(&mut lines.chunk.bytes, granularity, &total.fields()?);
                lines.line_done()?;
            }
            return Ok(());
        }
        // Both statements read one snapshot: a deferred transaction takes it
        // at the first read and keeps it until COMMIT (WAL mode).
        conn.execute_batch("BEGIN")?;
        merge_folded_and_tail(conn, &filter, granularity, &mut format, lines)?;
        conn.execute_batch("COMMIT")?;
        Ok(())
    })
    .await
}

/// The folded totals in key order (an index range scan, no sort) with the
/// unfolded tail, grouped and sorted the same way, merged
/// in: a tail total with the key of a folded one is added to it.
fn merge_folded_and_tail(
    conn: &Connection,
    filter: &ExportFilter,
    granularity: Granularity,
    format: &mut RowFormatter<'_>,
    lines: &mut Lines,
) -> Result<(), StreamError> {
    let (table, bucket, _) = shape(granularity);
    let account = filter.account.as_ref().map(|a| a.as_str());
    let resource = filter.resource.as_ref().map(|r| r.as_str());
    let tail_sql = bucketed_sql(include_str!("../sql/sqlite/export_totals_tail.sql"), granularity);
    let mut tail_statement = conn.prepare(&tail_sql)?;
    let mut tail_rows = tail_statement.query(params![
        to_micros(start_of(filter.from)),
        to_micros(start_of(filter.to)),
        account,
        resource,
    ])?;
    let mut tail = tail_total(&mut tail_rows)?;
    // A total may come in several rows, its parts (migration 0011; one part
    // unless it passed 64 bits), one after another in key order: they are
    // added below, checked. (A GROUP BY here cost 40 % of the daily export.)
    let folded_sql = format!(
        "SELECT account, resource, {bucket}, amount, entries FROM {table}
         WHERE {bucket} >= ?1 AND {bucket} < ?2
           AND (?3 IS NULL OR account = ?3) AND (?4 IS NULL OR resource = ?4)
         ORDER BY account, resource, {bucket}, part"
    );
    let mut statement = conn.prepare(&folded_sql)?;
    let mut rows = statement.query(params![
        filter.from.to_string(),
        filter.to.to_string(),
        account,
        resource
    ])?;
    let mut order = AscendingKeys::default();
    // The total being read: its parts are added until the key changes.
    let mut pending: Option<PendingTotal> = None;
    while let Some(row) = rows.next()? {
        let part = total_fields(row)?;
        if let Some(total) = pending.as_mut().filter(|p| p.has_key(&part)) {
            total.add(i128::from(part.amount), part.entries)?;
            continue;
        }
        if let Some(total) = pending.take() {
            write_with_tail(total, &mut tail, &mut tail_rows, granularity, format, lines)?;
        }
        order.advance(part.account, part.resource, part.bucket)?;
        pending = Some(PendingTotal::from(&part));
    }
    if let Some(total) = pending.take() {
        write_with_tail(total, &mut tail, &mut tail_rows, granularity, format, lines)?;
    }
    while let Some(t) = &tail {
        format.total(&mut lines.chunk.bytes, granularity, &t.fields()?);
        lines.line_done()?;
        tail = tail_total(&mut tail_rows)?;
    }
    Ok(())
}

/// Writes a folded total, after the tail totals that sort before it and with
/// the tail total of its own key added.
fn write_with_tail(
    mut folded: PendingTotal,
    tail: &mut Option<TailTotal>,
    tail_rows: &mut rusqlite::Rows<'_>,
    granularity: Granularity,
    format: &mut RowFormatter<'_>,
    lines: &mut Lines,
) -> Result<(), StreamError> {
    while let Some(t) = tail.as_ref() {
        match t.cmp_key(&folded.account, &folded.resource, folded.bucket) {
            Ordering::Less => {
                format.total(&mut lines.chunk.bytes, granularity, &t.fields()?);
                lines.line_done()?;
            }
            Ordering::Equal => folded.add(t.amount, t.entries)?,
            Ordering::Greater => break,
        }
        *tail = tail_total(tail_rows)?;
    }
    format.total(&mut lines.chunk.bytes, granularity, &folded.fields()?);
    lines.line_done()
}

/// A folded total whose parts are being added (owned: the row it came from
/// is gone once the next is read), in 128 bits until it is written: its
/// parts, or its tail, may leave 64 bits where the rest brings it back.
struct PendingTotal {
    account: Vec<u8>,
    resource: Vec<u8>,
    bucket: NaiveDate,
    amount: i128,
    entries: i64,
}

impl PendingTotal {
    fn from(part: &TotalFields<'_>) -> Self {
        Self {
            account: part.account.to_vec(),
            resource: part.resource.to_vec(),
            bucket: part.bucket,
            amount: i128::from(part.amount),
            entries: part.entries,
        }
    }

    fn has_key(&self, part: &TotalFields<'_>) -> bool {
        (self.account.as_slice(), self.resource.as_slice(), self.bucket) == (part.account, part.resource, part.bucket)
    }

    /// Adds another part, or the tail of its key.
    fn add(&mut self, amount: i128, entries: i64) -> Result<(), StreamError> {
        self.amount += amount;
        self.entries = self.entries.checked_add(entries).ok_or_else(|| {
            StreamError::Data(format!(
                "the entry count of account '{}', resource '{}', {} exceeds 64 bits",
                String::from_utf8_lossy(&self.account),
                String::from_utf8_lossy(&self.resource),
                self.bucket
            ))
        })?;
        Ok(())
    }

    /// Its fields, once its amount is known to fit an export's 64 bits.
    fn fields(&self) -> Result<TotalFields<'_>, StreamError> {
        Ok(TotalFields {
            account: &self.account,
            resource: &self.resource,
            bucket: self.bucket,
            amount: export_amount(
                self.amount,
                &String::from_utf8_lossy(&self.account),
                &String::from_utf8_lossy(&self.resource),
                self.bucket,
            )?,
            entries: self.entries,
        })
    }
}

/// The next total of the tail, owned (the tail is read alongside the folded rows).
fn tail_total(rows: &mut rusqlite::Rows<'_>) -> Result<Option<TailTotal>, StreamError> {
    rows.next()?.map(summed_total).transpose()
}

/// (account, resource, bucket text, high, low, entries): a total summed
/// from ledger rows in two halves (`sqlite::joined`), owned.
fn summed_total(row: &Row<'_>) -> Result<TailTotal, StreamError> {
    Ok(TailTotal {
        account: String::from_utf8_lossy(text(row, 0)?).into_owned(),
        resource: String::from_utf8_lossy(text(row, 1)?).into_owned(),
        bucket: date(text(row, 2)?)?,
        amount: super::joined(integer(row, 3)?, integer(row, 4)?),
        entries: integer(row, 5)?,
    })
}

/// (account, resource, bucket text, amount, entries) as borrowed fields.
fn total_fields<'r>(row: &'r Row<'_>) -> Result<TotalFields<'r>, StreamError> {
    Ok(TotalFields {
        account: text(row, 0)?,
        resource: text(row, 1)?,
        bucket: date(text(row, 2)?)?,
        amount: integer(row, 3)?,
        entries: integer(row, 4)?,
    })
}

fn integer(row: &Row<'_>, index: usize) -> Result<i64, StreamError> {
    optional_integer(row, index)?.ok_or_else(|| unexpected(index, "NULL"))
}

fn optional_integer(row: &Row<'_>, index: usize) -> Result<Option<i64>, StreamError> {
    match row.get_ref(index)? {
        ValueRef::Integer(v) => Ok(Some(v)),
        ValueRef::Null => Ok(None),
        _ => Err(unexpected(index, "a value that is not an integer")),
    }
}

fn text<'r>(row: &'r Row<'_>, index: usize) -> Result<&'r [u8], StreamError> {
    optional_text(row, index)?.ok_or_else(|| unexpected(index, "NULL"))
}

fn optional_text<'r>(row: &'r Row<'_>, index: usize) -> Result<Option<&'r [u8]>, StreamError> {
    match row.get_ref(index)? {
        ValueRef::Text(v) | ValueRef::Blob(v) => Ok(Some(v)),
        ValueRef::Null => Ok(None),
        _ => Err(unexpected(index, "a number where text belongs")),
    }
}

fn unexpected(index: usize, what: &str) -> StreamError {
    StreamError::Data(format!("column {index} of a stored row holds {what}"))
}

/// A stored `YYYY-MM-DD` bucket, read without a general date parser.
fn date(text: &[u8]) -> Result<NaiveDate, StreamError> {
    let digits = |range: std::ops::Range<usize>| {
        text[range]
            .iter()
            .try_fold(0u32, |n, &b| b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0')))
    };
    let parsed = if text.len() == 10 && text[4] == b'-' && text[7] == b'-' {
        match (digits(0..4), digits(5..7), digits(8..10)) {
            (Some(y), Some(m), Some(d)) => NaiveDate::from_ymd_opt(y as i32, m, d),
            _ => None,
        }
    } else {
        None
    };
    parsed.ok_or_else(|| {
        StreamError::Data(format!(
            "the database holds a malformed date {:?}",
            String::from_utf8_lossy(text)
        ))
    })
}
