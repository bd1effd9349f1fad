//! The CSV lines of the ledger and totals exports, appended straight to a byte
//! buffer. Both stores feed rows in as borrowed fields (PostgreSQL from a
//! binary `COPY`, SQLite from its statement), so a row costs no allocation;
//! this module is the one place that decides how a value is written.
//!
//! The output is what the `csv` crate wrote with its defaults (RFC 4180:
//! quotes only around a field holding `,` `"` CR or LF, quotes doubled, `\n`
//! after each record), instants as `to_rfc3339_opts(AutoSi, true)` and amounts
//! as `Amount`'s `Display` (normalised decimal), all with integer arithmetic.

use chrono::{DateTime, Datelike, NaiveDate};

use crate::domain::Catalog;
use crate::domain::period::Granularity;

/// A chunk is handed to the output once it holds this many bytes.
pub(crate) const CHUNK_BYTES: usize = 1 << 16;

/// One ledger row, borrowed from wherever the store read it.
pub(crate) struct EntryFields<'a> {
    pub id: i64,
    pub account: &'a [u8],
    pub resource: &'a [u8],
    /// Minor units of the resource.
    pub amount: i64,
    /// µs since the Unix epoch.
    pub occurred_at: i64,
    /// µs since the Unix epoch.
    pub recorded_at: i64,
    pub idempotency_key: &'a [u8],
    pub source: Option<&'a [u8]>,
    pub reverses: Option<i64>,
    /// JSON text as stored.
    pub metadata: Option<&'a [u8]>,
}

/// A value the export cannot write (never produced by Tally's own writes).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct FormatError(pub String);

/// Formats export rows; remembers each resource's decimals so a row needs no
/// catalog lookup by string.
pub(crate) struct RowFormatter<'c> {
    catalog: &'c Catalog,
    decimals: Vec<(Vec<u8>, u32)>,
    scratch: Vec<u8>,
    occurred_day: DayCache,
    recorded_day: DayCache,
}

impl<'c> RowFormatter<'c> {
    /// A formatter for amounts of `catalog`'s resources.
    pub(crate) fn new(catalog: &'c Catalog) -> Self {
        Self {
            catalog,
            decimals: Vec::new(),
            scratch: Vec::new(),
            occurred_day: DayCache::default(),
            recorded_day: DayCache::default(),
        }
    }

    fn decimals(&mut self, resource: &[u8]) -> u32 {
        if let Some((_, d)) = self.decimals.iter().find(|(name, _)| name == resource) {
            return *d;
        }
        // Looked up (and a resource the catalog lacks said) once per export.
        let d = crate::usage::shown_decimals(self.catalog, &String::from_utf8_lossy(resource));
        self.decimals.push((resource.to_vec(), d));
        d
    }

    /// Appends one entries-export line.
    pub(crate) fn entry(&mut self, buf: &mut Vec<u8>, row: &EntryFields<'_>) -> Result<(), FormatError> {
        let decimals = self.decimals(row.resource);
        push_int(buf, row.id);
        buf.push(b',');
        push_field(buf, row.account);
        buf.push(b',');
        push_field(buf, row.resource);
        buf.push(b',');
        push_amount(buf, row.amount, decimals);
        buf.push(b',');
        push_instant(buf, row.occurred_at, &mut self.occurred_day)?;
        buf.push(b',');
        push_instant(buf, row.recorded_at, &mut self.recorded_day)?;
        buf.push(b',');
        push_field(buf, row.idempotency_key);
        buf.push(b',');
        push_field(buf, row.source.unwrap_or_default());
        buf.push(b',');
        if let Some(id) = row.reverses {
            push_int(buf, id);
        }
        buf.push(b',');
        if let Some(json) = row.metadata {
            // Compact JSON with sorted keys, whatever the stored spelling
            // (PostgreSQL's jsonb text has spaces and its own key order).
            // Text that is not JSON is left out, as it always was.
            if let Ok(value) = serde_json::from_slice::<serde_json::Value>(json) {
                self.scratch.clear();
                serde_json::to_writer(&mut self.scratch, &value).map_err(|e| FormatError(e.to_string()))?;
                push_field(buf, &self.scratch);
            }
        }
        buf.push(b'\n');
        Ok(())
    }

    /// Appends one daily or monthly totals line. `bucket` is the bucket's
    /// first day.
    pub(crate) fn total(&mut self, buf: &mut Vec<u8>, granularity: Granularity, total: &TotalFields<'_>) {
        let decimals = self.decimals(total.resource);
        push_field(buf, total.account);
        buf.push(b',');
        push_field(buf, total.resource);
        buf.push(b',');
        push_date(buf, total.bucket, granularity);
        buf.push(b',');
        push_amount(buf, total.amount, decimals);
        buf.push(b',');
        push_int(buf, total.entries);
        buf.push(b'\n');
    }
}

/// One (account, resource, bucket) total, borrowed.
pub(crate) struct TotalFields<'a> {
    pub account: &'a [u8],
    pub resource: &'a [u8],
    pub bucket: NaiveDate,
    /// Minor units.
    pub amount: i64,
    pub entries: i64,
}

/// Appends a field, quoted (RFC 4180) when it holds a delimiter, quote or line break.
pub(crate) fn push_field(buf: &mut Vec<u8>, field: &[u8]) {
    if field.iter().any(|&b| matches!(b, b',' | b'"' | b'\r' | b'\n')) {
        buf.push(b'"');
        for &b in field {
            if b == b'"' {
                buf.push(b'"');
            }
            buf.push(b);
        }
        buf.push(b'"');
    } else {
        buf.extend_from_slice(field);
    }
}

fn push_int(buf: &mut Vec<u8>, value: i64) {
    buf.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// `minor` units with `decimals` fractional digits, normalised (no trailing
/// zeros, no point for a whole number), exactly as `Amount` displays it.
pub(crate) fn push_amount(buf: &mut Vec<u8>, minor: i64, decimals: u32) {
    if decimals == 0 {
        push_int(buf, minor);
        return;
    }
    let scale = 10u64.pow(decimals);
    let magnitude = minor.unsigned_abs();
    if minor < 0 {
        buf.push(b'-');
    }
    buf.extend_from_slice(itoa::Buffer::new().format(magnitude / scale).as_bytes());
    let mut fraction = magnitude % scale;
    if fraction == 0 {
        return;
    }
    let mut digits = decimals as usize;
    while fraction.is_multiple_of(10) {
        fraction /= 10;
        digits -= 1;
    }
    buf.push(b'.');
    push_padded(buf, fraction, digits);
}

/// `value` left-padded with zeros to `width` digits.
fn push_padded(buf: &mut Vec<u8>, value: u64, width: usize) {
    let mut digits = itoa::Buffer::new();
    let text = digits.format(value);
    buf.extend(std::iter::repeat_n(b'0', width.saturating_sub(text.len())));
    buf.extend_from_slice(text.as_bytes());
}

const MICROS_PER_DAY: i64 = 86_400_000_000;

/// The date part of the last instant written: rows of an export often share
/// a day, and the calendar arithmetic is the costly part of an instant.
#[derive(Default)]
pub(crate) struct DayCache {
    day: Option<i64>,
    text: Vec<u8>,
}

/// An instant (µs since the Unix epoch) as RFC 3339 in UTC with `Z` and only
/// the fractional digits needed (none, 3 or 6), like
/// `to_rfc3339_opts(SecondsFormat::AutoSi, true)`.
pub(crate) fn push_instant(buf: &mut Vec<u8>, micros: i64, cache: &mut DayCache) -> Result<(), FormatError> {
    let day = micros.div_euclid(MICROS_PER_DAY);
    if cache.day != Some(day) {
        let date = DateTime::from_timestamp_micros(micros)
            .ok_or_else(|| FormatError(format!("timestamp {micros} µs is out of range")))?
            .date_naive();
        cache.text.clear();
        push_date(&mut cache.text, date, Granularity::Day);
        cache.day = Some(day);
    }
    buf.extend_from_slice(&cache.text);
    let of_day = micros.rem_euclid(MICROS_PER_DAY);
    let seconds = (of_day / 1_000_000) as u32;
    buf.push(b'T');
    push_2(buf, seconds / 3600);
    buf.push(b':');
    push_2(buf, seconds / 60 % 60);
    buf.push(b':');
    push_2(buf, seconds % 60);
    let us = (of_day % 1_000_000) as u32;
    if us != 0 {
        buf.push(b'.');
        let (value, width) = if us.is_multiple_of(1000) {
            (us / 1000, 3)
        } else {
            (us, 6)
        };
        push_padded(buf, u64::from(value), width);
    }
    buf.push(b'Z');
    Ok(())
}

/// A bucket: `YYYY-MM-DD` (day) or `YYYY-MM` (month).
pub(crate) fn push_date(buf: &mut Vec<u8>, date: NaiveDate, granularity: Granularity) {
    push_year(buf, date.year());
    buf.push(b'-');
    push_2(buf, date.month());
    if granularity == Granularity::Day {
        buf.push(b'-');
        push_2(buf, date.day());
    }
}

/// Four digits, or chrono's signed form outside 0..=9999.
fn push_year(buf: &mut Vec<u8>, year: i32) {
    if (0..=9999).contains(&year) {
        let y = year as u32;
        push_2(buf, y / 100);
        push_2(buf, y % 100);
    } else {
        buf.extend_from_slice(format!("{year:+05}").as_bytes());
    }
}

fn push_2(buf: &mut Vec<u8>, value: u32) {
    buf.push(b'0' + (value / 10) as u8);
    buf.push(b'0' + (value % 10) as u8);
}

#[cfg(test)]
mod tests {
    use chrono::{SecondsFormat, TimeZone, Utc};
    use proptest::prelude::*;

    use super::*;
    use crate::domain::Amount;

    fn amount(minor: i64, decimals: u32) -> String {
        let mut buf = Vec::new();
        push_amount(&mut buf, minor, decimals);
        String::from_utf8(buf).unwrap()
    }

    fn instant(micros: i64) -> String {
        let mut buf = Vec::new();
        push_instant(&mut buf, micros, &mut DayCache::default()).unwrap();
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn amounts_read_like_the_amount_type() {
        assert_eq!(amount(-5, 2), "-0.05");
        assert_eq!(amount(125, 2), "1.25");
        assert_eq!(amount(-100, 2), "-1");
        assert_eq!(amount(1, 9), "0.000000001");
        assert_eq!(amount(1_500_000_000, 9), "1.5");
        assert_eq!(amount(i64::MIN, 0), i64::MIN.to_string());
        assert_eq!(amount(i64::MIN, 9), Amount::from_minor(i64::MIN, 9).to_string());
    }

    #[test]
    fn instants_read_like_rfc3339_with_automatic_fraction() {
        assert_eq!(instant(0), "1970-01-01T00:00:00Z");
        assert_eq!(instant(1_000), "1970-01-01T00:00:00.001Z");
        assert_eq!(instant(-1), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn a_cached_day_is_only_reused_for_the_same_day() {
        let mut cache = DayCache::default();
        let mut buf = Vec::new();
        for micros in [0, 86_399_999_999, 86_400_000_000, -1, 1] {
            buf.clear();
            push_instant(&mut buf, micros, &mut cache).unwrap();
            let expected = Utc
                .timestamp_micros(micros)
                .unwrap()
                .to_rfc3339_opts(SecondsFormat::AutoSi, true);
            assert_eq!(String::from_utf8(buf.clone()).unwrap(), expected);
        }
    }

    #[test]
    fn fields_are_quoted_only_when_needed() {
        let mut buf = Vec::new();
        push_field(&mut buf, b"plain");
        push_field(&mut buf, b"a,\"b\"\nc");
        assert_eq!(buf, b"plain\"a,\"\"b\"\"\nc\"");
    }

    proptest! {
        #[test]
        fn any_amount_matches_amount_display(minor in any::<i64>(), decimals in 0u32..=9) {
            prop_assert_eq!(amount(minor, decimals), Amount::from_minor(minor, decimals).to_string());
        }

        #[test]
        fn any_instant_matches_chrono(micros in -62_000_000_000_000_000i64..250_000_000_000_000_000) {
            let t = Utc.timestamp_micros(micros).unwrap();
            prop_assert_eq!(instant(micros), t.to_rfc3339_opts(SecondsFormat::AutoSi, true));
        }

        #[test]
        fn any_field_matches_the_csv_crate(field in ".*", other in "[a,\"\r\n]{0,4}") {
            let mut ours = Vec::new();
            push_field(&mut ours, field.as_bytes());
            ours.push(b',');
            push_field(&mut ours, other.as_bytes());
            ours.push(b'\n');
            let mut theirs = csv::Writer::from_writer(Vec::new());
            theirs.write_record([&field, &other]).unwrap();
            prop_assert_eq!(ours, theirs.into_inner().unwrap());
        }
    }
}
