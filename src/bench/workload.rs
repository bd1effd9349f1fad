//! The synthetic ledger rows benchmarks post, and their encodings.
//!
//! Row `i` is a pure function of `i`, the account count and a base time, so
//! Tally and every baseline see exactly the same rows:
//!
//! - account `acct-{i % accounts}`;
//! - resource: the built-in resources round-robin ([`RESOURCES`]);
//! - amount: a whole number from 1 to 100 (valid for every built-in
//!   resource, `agent_minutes` included);
//! - idempotency key `k-{i}` (unique across the run);
//! - `occurred_at`: the base time minus `i % 86 400` seconds, so within the
//!   day before the base time and never in the future.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

/// The resources of the built-in catalog, used round-robin.
pub const RESOURCES: [&str; 5] = [
    "api_requests",
    "storage_bytes",
    "llm_tokens",
    "ai_generations",
    "agent_minutes",
];

/// Seconds in a day: how far back `occurred_at` spreads.
const SPREAD_SECONDS: u64 = 86_400;

/// One ledger row as the benchmarks post it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// `acct-N`.
    pub account: String,
    /// A built-in resource.
    pub resource: &'static str,
    /// A whole amount from 1 to 100.
    pub amount: i64,
    /// When the usage happened (whole seconds, UTC).
    pub occurred_at: DateTime<Utc>,
    /// `k-N`, unique across the run.
    pub idempotency_key: String,
}

/// How rows are generated.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// Distinct accounts (`acct-0` … `acct-{accounts - 1}`); at least 1.
    pub accounts: u64,
    /// The newest `occurred_at`; rows spread over the day before it.
    pub base: DateTime<Utc>,
}

impl Workload {
    /// A workload over `accounts` accounts whose newest row is one minute
    /// ago (whole seconds), safely inside Tally's accepted window.
    pub fn recent(accounts: u64) -> Self {
        let now = Utc::now() - chrono::Duration::minutes(1);
        let base = DateTime::from_timestamp(now.timestamp(), 0).unwrap_or(now);
        Self {
            accounts: accounts.max(1),
            base,
        }
    }

    /// Row number `i`.
    pub fn row(&self, i: u64) -> Row {
        let back = i64::try_from(i % SPREAD_SECONDS).unwrap_or(0);
        let resource_index = usize::try_from(i % RESOURCES.len() as u64).unwrap_or(0);
        // A cheap deterministic scramble so amounts are not a plain ramp.
        let amount = i64::try_from(i.wrapping_mul(7_919) % 100).unwrap_or(0) + 1;
        Row {
            account: format!("acct-{}", i % self.accounts),
            resource: RESOURCES[resource_index],
            amount,
            occurred_at: self.base - chrono::Duration::seconds(back),
            idempotency_key: format!("k-{i}"),
        }
    }

    /// Rows `0..count`.
    pub fn rows(&self, count: u64) -> Vec<Row> {
        (0..count).map(|i| self.row(i)).collect()
    }

    /// Rows `first..first + count`.
    pub fn rows_from(&self, first: u64, count: u64) -> Vec<Row> {
        (first..first + count).map(|i| self.row(i)).collect()
    }
}

/// An entry in a `POST /v1/entries` body (amount as a decimal string).
#[derive(Serialize)]
struct EntryJson<'a> {
    account: &'a str,
    resource: &'a str,
    amount: String,
    idempotency_key: &'a str,
    occurred_at: String,
}

/// `{"entries": […]}`.
#[derive(Serialize)]
struct BatchJson<'a> {
    entries: Vec<EntryJson<'a>>,
}

/// `occurred_at` as RFC 3339 with a `Z` suffix and whole seconds.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The JSON body of `POST /v1/entries` for `rows`: `{"entries": […]}`.
///
/// # Errors
///
/// Only if JSON serialization fails, which it does not for these types.
pub fn batch_body(rows: &[Row]) -> serde_json::Result<Vec<u8>> {
    let body = BatchJson {
        entries: rows
            .iter()
            .map(|row| EntryJson {
                account: &row.account,
                resource: row.resource,
                amount: row.amount.to_string(),
                idempotency_key: &row.idempotency_key,
                occurred_at: rfc3339(row.occurred_at),
            })
            .collect(),
    };
    serde_json::to_vec(&body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_deterministic_unique_and_valid() {
        let workload = Workload::recent(10);
        let rows = workload.rows(200_000);
        assert_eq!(rows[12].account, "acct-2");
        assert_eq!(rows[12].idempotency_key, "k-12");
        assert_eq!(rows[12], workload.row(12));
        assert!(rows.iter().all(|r| (1..=100).contains(&r.amount)));
        assert!(rows.iter().all(|r| r.occurred_at <= workload.base));
        assert!(
            rows.iter()
                .all(|r| workload.base - r.occurred_at < chrono::Duration::days(1))
        );
        let keys: std::collections::HashSet<&str> = rows.iter().map(|r| r.idempotency_key.as_str()).collect();
        assert_eq!(keys.len(), rows.len());
        for (i, resource) in RESOURCES.iter().enumerate() {
            assert_eq!(rows[i].resource, *resource);
        }
    }

    #[test]
    fn batch_body_is_the_documented_shape() {
        let workload = Workload::recent(3);
        let body = batch_body(&workload.rows(2)).expect("serializes");
        let value: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
        let entries = value["entries"].as_array().expect("entries array");
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[1]["account"], "acct-1");
        assert_eq!(entries[1]["resource"], "storage_bytes");
        assert!(entries[1]["amount"].is_string());
        assert!(entries[1]["occurred_at"].as_str().expect("string").ends_with('Z'));
    }
}

/// Ledger rows generated inside the database by one SQL statement (no client
/// round trip per row), for benchmarks that need millions of rows already
/// stored: `tally-bench rollup` and `tally-bench quota`.
///
/// Row `i` (for `i` in `first..first + count`):
///
/// - account `{account_prefix}{i % accounts}`;
/// - resource: `resource` when set, else one of [`RESOURCES`],
///   `(i + i / accounts) % 5` (so an account sees every resource);
/// - amount: `(i × 7 919) % 100 + 1` (a whole number from 1 to 100, valid for
///   every built-in resource, in minor units: for `agent_minutes`, which has 2
///   decimals, that is 0.01–1.00);
/// - idempotency key `{key_prefix}{i}`;
/// - `occurred_at`: whole seconds, `base` minus `(i × 104 729) % (days × 86 400)`
///   seconds, so spread over the `days` days before `base`, never in the future;
/// - `recorded_at`: the time of the insert.
#[derive(Debug, Clone)]
pub struct SqlLedger {
    /// First row number.
    pub first: u64,
    /// Rows to insert.
    pub count: u64,
    /// Distinct accounts; at least 1.
    pub accounts: u64,
    /// Account names are this prefix and a number.
    pub account_prefix: String,
    /// A single resource for every row, else the built-in ones round-robin.
    pub resource: Option<&'static str>,
    /// Days `occurred_at` spreads over; at least 1.
    pub days: u64,
    /// The newest `occurred_at`, in whole seconds since the epoch.
    pub base_epoch_seconds: i64,
    /// Idempotency keys are this prefix and the row number.
    pub key_prefix: String,
}

impl SqlLedger {
    fn span_seconds(&self) -> u64 {
        self.days.max(1) * SPREAD_SECONDS
    }

    fn resource_sql(&self) -> String {
        match self.resource {
            Some(resource) => format!("'{resource}'"),
            None => {
                let arms: String = RESOURCES
                    .iter()
                    .enumerate()
                    .map(|(n, r)| format!(" WHEN {n} THEN '{r}'"))
                    .collect();
                format!(
                    "CASE (i + i / {}) % {}{arms} END",
                    self.accounts.max(1),
                    RESOURCES.len()
                )
            }
        }
    }

    /// The SQLite statement (a recursive CTE feeding one `INSERT … SELECT`).
    pub fn sqlite_insert(&self) -> String {
        self.sqlite_insert_with_metadata(0)
    }

    /// [`SqlLedger::sqlite_insert`], with `metadata` set on the rows whose
    /// number is a multiple of `every` (none when 0): a JSON object of about
    /// 100 bytes, `{"note": "a, \"quoted\" note", "region": "eu-{i % 3}",
    /// "request_id": "req-{i}", "tags": ["batch", "export"]}` (a comma and
    /// quotes, so CSV quoting is exercised; no newline).
    pub fn sqlite_insert_with_metadata(&self, every: u64) -> String {
        let (first, last) = (self.first, self.first + self.count);
        let (column, value) = if every > 0 {
            (
                ", metadata",
                format!(
                    ", CASE WHEN i % {every} = 0 THEN json_object('note', 'a, \"quoted\" note', \
                     'region', 'eu-' || (i % 3), 'request_id', 'req-' || i, 'tags', json_array('batch', 'export')) END"
                ),
            )
        } else {
            ("", String::new())
        };
        format!(
            "WITH RECURSIVE n(i) AS (SELECT {first} UNION ALL SELECT i + 1 FROM n WHERE i + 1 < {last}) \
             INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key{column}) \
             SELECT '{account}' || (i % {accounts}), {resource}, (i * 7919) % 100 + 1, \
             ({base} - (i * 104729) % {span}) * 1000000, \
             CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER), '{key}' || i{value} FROM n",
            account = self.account_prefix,
            accounts = self.accounts.max(1),
            resource = self.resource_sql(),
            base = self.base_epoch_seconds,
            span = self.span_seconds(),
            key = self.key_prefix,
        )
    }

    /// The PostgreSQL statement (`generate_series` feeding one `INSERT … SELECT`;
    /// `tx_id` takes its default, the inserting transaction).
    pub fn postgres_insert(&self) -> String {
        self.postgres_insert_with_metadata(0)
    }

    /// [`SqlLedger::postgres_insert`], with `metadata` on every `every`-th row
    /// as in [`SqlLedger::sqlite_insert_with_metadata`] (a `jsonb` object).
    pub fn postgres_insert_with_metadata(&self, every: u64) -> String {
        let (first, last) = (self.first, self.first + self.count - 1);
        let (column, value) = if every > 0 {
            (
                ", metadata",
                format!(
                    ", CASE WHEN i % {every} = 0 THEN jsonb_build_object('note', 'a, \"quoted\" note', \
                     'region', 'eu-' || (i % 3), 'request_id', 'req-' || i, 'tags', jsonb_build_array('batch', 'export')) END"
                ),
            )
        } else {
            ("", String::new())
        };
        format!(
            "INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key{column}) \
             SELECT '{account}' || (i % {accounts}), {resource}, (i * 7919) % 100 + 1, \
             to_timestamp({base} - (i * 104729) % {span}), now(), '{key}' || i{value} \
             FROM generate_series({first}::bigint, {last}::bigint) AS g(i)",
            account = self.account_prefix,
            accounts = self.accounts.max(1),
            resource = self.resource_sql(),
            base = self.base_epoch_seconds,
            span = self.span_seconds(),
            key = self.key_prefix,
        )
    }
}
