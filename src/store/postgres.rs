//! The PostgreSQL store: the production engine.
//!
//! Batches go in as one `INSERT … SELECT FROM UNNEST(…)` per request: a
//! thousand rows cost one round trip. Rows are inserted sorted by
//! (account, idempotency_key) so that two concurrent batches sharing keys take
//! their unique-index locks in the same order and cannot deadlock.

mod consume_group;
mod export;

use sqlx::ConnectOptions;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use crate::domain::catalog::{Enforcement, Window};
use crate::domain::period::{Granularity, start_of};
use crate::domain::plan::{DefaultPlanChange, Override, OverrideChange, Period, PlanAssignment, from_the_start};
use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{FromRow, PgPool, Postgres, QueryBuilder};

use super::API_KEY_COLUMNS;
use super::settled::{COUNT_A_REPAIR_SQL, COUNT_REPAIRS_SQL, Settled, SettledSums, bounds};
use super::{
    Backend, BeforeCommit, CheckInputs, CommittedMark, ConsumeDecider, ConsumeResult, ConsumeRules, CsvSink,
    DecidedConsume, ExportFilter, JobLock, NewApiKey, OpenError, Store, StoreError, StreamError, TotalMismatch,
    TotalName, TotalRow, VerifiedTotal, diff_totals, natural_key, replay, resolve_outcomes, totals_sql,
};
use crate::domain::{
    AccountId, Amount, ApiKey, Catalog, Entry, EntryFilter, IdempotencyKey, InsertOutcome, NewEntry, ResourceName, Role,
};
use consume_group::ConsumeGroups;

/// How long opening the store waits for its first connection: a server
/// that is up answers in milliseconds, and one that does not answer by then
/// (a host gone, packets dropped) is reported rather than waited for.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a request waits for a pooled connection before it answers 503.
/// Why not longer: with the server down, sqlx keeps retrying a refused
/// connection for all of it, and a client with an ordinary 5 s timeout would
/// see only its own timeout, never the contract's 503 and its Retry-After.
/// 16 connections busy for 3 s is an overload that a 503 describes well too.
pub const POOL_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

/// One connection outside the pool, closed at once: `Ok` when the server
/// accepts it within `timeout`, else why not ("Connection refused", an
/// unknown database, a refused login, no answer). The pool alone retries a
/// refused connection until its acquire timeout and then says only that it
/// timed out.
async fn connect_once(options: &PgConnectOptions, timeout: Duration) -> Result<(), OpenError> {
    match tokio::time::timeout(timeout, options.connect()).await {
        Ok(Ok(connection)) => {
            let _ = sqlx::Connection::close(connection).await;
            Ok(())
        }
        Ok(Err(sqlx::Error::Io(source))) if source.kind() == std::io::ErrorKind::NotFound => match socket_path(options)
        {
            Some(path) => Err(OpenError::NoSocket { path, source }),
            None => Err(sqlx::Error::Io(source).into()),
        },
        Ok(Err(e)) => Err(e.into()),
        // Rounded up: a last attempt of 250 ms did not answer "within 0 s".
        Err(_) => Err(OpenError::NoAnswer {
            seconds: timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0),
        }),
    }
}

/// How long opening the store waits for a server that answers but does not
/// accept connections yet (SQLSTATE 57P03: starting up, recovering after a
/// crash, a standby not yet promoted). Such a server says it will be ready,
/// unlike one that refuses the connection or is not there, which fail at
/// once (`connect_once`) unless the server has already answered 57P03 (see
/// `wait_until_accepting`); a minute covers an ordinary start and crash
/// recovery, and a process manager's restart covers the rest.
pub const START_WAIT: Duration = Duration::from_secs(60);

/// How often a server that is starting is asked again.
const START_POLL: Duration = Duration::from_millis(250);

/// [`connect_once`], asked again every [`START_POLL`] for at most
/// [`START_WAIT`] while the server answers that it cannot accept connections
/// now (57P03). Logs once when it starts waiting. Once it has answered so,
/// a refused connection or a missing socket is waited through as well: a
/// server shutting down answers 57P03 too, and in a restart it then goes
/// away for a moment before it starts (review AY).
async fn wait_until_accepting(options: &PgConnectOptions) -> Result<(), OpenError> {
    let started = tokio::time::Instant::now();
    let deadline = started + START_WAIT;
    // What the server last said while refusing; set once it has.
    let mut refused_why: Option<String> = None;
    loop {
        let attempt = CONNECT_TIMEOUT.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        // `Some` when the server went away after refusing.
        let error = match connect_once(options, attempt.max(START_POLL)).await {
            Ok(()) => {
                if refused_why.is_some() {
                    tracing::info!(
                        waited_ms = started.elapsed().as_millis(),
                        "PostgreSQL now accepts connections, after {} ms",
                        started.elapsed().as_millis()
                    );
                }
                return Ok(());
            }
            Err(OpenError::Database(sqlx::Error::Database(db))) if db.code().as_deref() == Some("57P03") => {
                let why = not_accepting_why(db.as_ref());
                if refused_why.is_none() {
                    tracing::warn!(
                        why = %why,
                        "PostgreSQL does not accept connections yet ({why}); waiting for it, at most {} s",
                        START_WAIT.as_secs()
                    );
                }
                refused_why = Some(why);
                None
            }
            Err(
                gone @ (OpenError::NoSocket { .. }
                | OpenError::NoAnswer { .. }
                | OpenError::Database(sqlx::Error::Io(_))),
            ) if refused_why.is_some() => Some(gone),
            Err(other) => return Err(other),
        };
        if tokio::time::Instant::now() + START_POLL >= deadline {
            // Only a refusal (57P03), or a failure after one, comes here, so
            // the refusal is known: say it, with what ended the wait, rather
            // than the last failure alone (review BB).
            return Err(OpenError::NotAcceptingConnections {
                seconds: START_WAIT.as_secs(),
                why: refused_why.unwrap_or_default(),
                then_gone: error.map(Box::new),
            });
        }
        tokio::time::sleep(START_POLL).await;
    }
}

/// PostgreSQL's message for a refused start-up, with its detail when it
/// has one ("Hot standby mode is disabled.").
fn not_accepting_why(db: &dyn sqlx::error::DatabaseError) -> String {
    let message = db.message();
    match db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .and_then(|pg| pg.detail())
    {
        Some(detail) => format!("{message}: {detail}"),
        None => message.to_owned(),
    }
}

/// The Unix socket `options` connect through, if any: the folder (`host=`
/// a path, or a socket of its own) joined with the name PostgreSQL gives it,
/// `.s.PGSQL.<port>`, as the driver does.
fn socket_path(options: &PgConnectOptions) -> Option<String> {
    let folder = match options.get_socket() {
        Some(folder) => folder.display().to_string(),
        None if options.get_host().starts_with('/') => options.get_host().to_owned(),
        None => return None,
    };
    Some(format!("{folder}/.s.PGSQL.{}", options.get_port()))
}

/// The PostgreSQL implementation of [`Store`].
pub struct PgStore {
    pool: PgPool,
    /// How the pool connects, for one attempt of its own when the pool
    /// cannot say why it has no connection ([`Store::why_unreachable`]).
    options: PgConnectOptions,
    catalog: Arc<Catalog>,
    /// Settled sums behind `used` (see [`super::settled`]).
    settled: SettledSums,
    /// Consumes decided in groups, started on the first consume (on the
    /// runtime that runs it).
    consume_groups: std::sync::OnceLock<ConsumeGroups>,
    /// The highest id below which every ledger row is committed or rolled
    /// back, as the entries listing last proved it (see `listing_horizon`).
    listing_proven: std::sync::Mutex<ProvenHorizon>,
}

/// A listing horizon once proven, and the ledger row at it.
#[derive(Debug, Default, Clone)]
struct ProvenHorizon {
    /// Every ledger row with an id at or below this one was committed or
    /// rolled back when it was proven.
    id: i64,
    /// The row with that id then: its transaction id and `recorded_at`, as
    /// text ([`ROW_IDENTITY`]). After a restore, or a failover that lost
    /// commits, ids are taken again below the horizon, and that row is gone
    /// or another.
    row: String,
}

/// What tells a ledger row from another that took its id after a restore.
const ROW_IDENTITY: &str = "tx_id::text || ' ' || recorded_at::text";

impl PgStore {
    /// The highest ledger row's id with that row, read in one statement.
    async fn highest_row(&self) -> Result<ProvenHorizon, StoreError> {
        let highest: Option<(i64, String)> = sqlx::query_as(&format!(
            "SELECT id, {ROW_IDENTITY} FROM entries ORDER BY id DESC LIMIT 1"
        ))
        .fetch_optional(&self.pool)
        .await?;
        Ok(highest.map(|(id, row)| ProvenHorizon { id, row }).unwrap_or_default())
    }

    /// The proven listing horizon, if it still describes this ledger: its
    /// row is still there, the same (a restore, or a failover that lost
    /// commits, takes the ledger back below it, and its ids are taken again).
    async fn proven_horizon(&self) -> Result<i64, StoreError> {
        let proven = self
            .listing_proven
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if proven.id == 0 {
            return Ok(0);
        }
        let row: Option<String> = sqlx::query_scalar(&format!("SELECT {ROW_IDENTITY} FROM entries WHERE id = $1"))
            .bind(proven.id)
            .fetch_optional(&self.pool)
            .await?;
        if row.as_deref() == Some(proven.row.as_str()) {
            return Ok(proven.id);
        }
        tracing::warn!(
            proven = proven.id,
            "the ledger no longer holds the row the entries listing proved its horizon {} at (restored, or failed \
             over?); proving it again",
            proven.id
        );
        *self
            .listing_proven
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = ProvenHorizon::default();
        Ok(0)
    }

    /// One page of the entries listing: `filter`'s rows with an id above
    /// `after_id` and at most `horizon`, in id order.
    async fn entries_page(&self, filter: &EntryFilter, after_id: i64, horizon: i64) -> Result<Vec<Entry>, StoreError> {
        let mut query = QueryBuilder::<Postgres>::new(format!("SELECT {ENTRY_COLUMNS} FROM entries WHERE id > "));
        query.push_bind(after_id);
        query.push(" AND id <= ").push_bind(horizon);
        if let Some(account) = &filter.account {
            query.push(" AND account = ").push_bind(account.as_str());
        }
        if let Some(resource) = &filter.resource {
            query.push(" AND resource = ").push_bind(resource.as_str());
        }
        if let Some(from) = filter.from {
            query.push(" AND occurred_at >= ").push_bind(from);
        }
        if let Some(to) = filter.to {
            query.push(" AND occurred_at < ").push_bind(to);
        }
        query.push(" ORDER BY id LIMIT ").push_bind(i64::from(filter.limit));
        let rows: Vec<EntryRow> = query.build_query_as().fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(|r| self.entry_from_row(r)).collect())
    }

    /// The highest id a listing may show so that a client paging with
    /// `after_id` never steps over a row that commits later.
    ///
    /// Why: an id is taken at insert, not at commit (invariant 3), so a
    /// batch still in flight can hold ids below rows already visible; a page
    /// ending past them would move the client's `after_id` beyond rows it has
    /// not seen, for good. So the listing reads the highest visible id, then
    /// waits for the transactions that had written and not ended at that
    /// moment (found by their transaction ids: a statement inserting ledger
    /// rows takes its transaction id before any row's id, migration 0014).
    /// Every id at or below that one is then committed or rolled back, for
    /// good, so the highest one proven is remembered: a full page below it
    /// waits for nothing. Readers are never waited for; nor is the rollup.
    /// The wait holds no pooled connection between its looks.
    ///
    /// [`Horizon::Stuck`]: a writer stayed open past [`LISTING_WAIT`].
    async fn listing_horizon(&self) -> Result<Horizon, StoreError> {
        let highest = self.highest_row().await?;
        // After the horizon was read, in its own statement: a transaction
        // that took an id at or below it had its transaction id by then.
        let mut writers: Vec<(String, Option<i32>)> = sqlx::query_as(include_str!("sql/postgres/listing_writers.sql"))
            .bind(ROLLUP_LOCK_KEY)
            .fetch_all(&self.pool)
            .await?;
        let started = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(1);
        while let Some((xid, pid)) = writers.first() {
            if started.elapsed() >= LISTING_WAIT {
                let who = match pid {
                    Some(pid) => format!("a transaction (backend pid {pid}, xid {xid})"),
                    None => format!("a prepared transaction (xid {xid}; see pg_prepared_xacts)"),
                };
                return Ok(Horizon::Stuck(StoreError::Busy(format!(
                    "the entries listing waits for writes in flight that may hold lower ids, and {who} has \
                     written and stayed open for over {} s; retry shortly, or end that transaction",
                    LISTING_WAIT.as_secs()
                ))));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_millis(20));
            let xids: Vec<&str> = writers.iter().map(|(xid, _)| xid.as_str()).collect();
            let still: Vec<String> = sqlx::query_scalar(
                "SELECT transactionid::text FROM pg_locks
                  WHERE locktype = 'transactionid' AND mode = 'ExclusiveLock' AND granted
                    AND transactionid::text = ANY($1)",
            )
            .bind(&xids)
            .fetch_all(&self.pool)
            .await?;
            writers.retain(|(xid, _)| still.contains(xid));
        }
        let horizon = highest.id;
        let mut proven = self
            .listing_proven
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if horizon > proven.id {
            *proven = highest;
        }
        Ok(Horizon::Proven(horizon))
    }

    /// One rollup batch (see [`Store::rollup_batch`]). `walk` finds the
    /// batch's end by walking `max_entries` rows; otherwise a backlog that
    /// looks small by its ids ends at the last foldable row, and a batch that
    /// turns out larger than `max_entries` is rolled back (`Ok(None)`).
    async fn fold_batch(
        &self,
        max_entries: u32,
        walk: bool,
        before_commit: &BeforeCommit,
    ) -> Result<Option<u64>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Two rollups (two replicas, or a manual run beside the scheduled one)
        // take turns per batch; each then reads the cursor the other left.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(ROLLUP_LOCK_KEY)
            .execute(&mut *tx)
            .await?;
        let (last_tx, last_id, watermark): (String, i64, String) = sqlx::query_as(
            "SELECT last_tx::text, last_id, pg_snapshot_xmin(pg_current_snapshot())::text
             FROM rollup_cursor WHERE name = 'rollup'",
        )
        .fetch_one(&mut *tx)
        .await?;
        // A backlog that fits in the batch (the usual case: the caller sizes
        // batches to it) ends at the last foldable row, found in one index
        // step; a larger one is walked to its max_entries-th row. Ids only
        // size the batch: whatever its end, it folds exactly the rows up to it.
        let newest_id: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM entries")
            .fetch_one(&mut *tx)
            .await?;
        let walk = walk || newest_id - last_id > i64::from(max_entries);
        let mut upper: Option<(String, i64)> = None;
        if walk {
            upper = sqlx::query_as(include_str!("sql/postgres/rollup_next_batch.sql"))
                .bind(&last_tx)
                .bind(last_id)
                .bind(&watermark)
                .bind(i64::from(max_entries))
                .fetch_optional(&mut *tx)
                .await?;
        }
        if upper.is_none() {
            upper = sqlx::query_as(include_str!("sql/postgres/rollup_last_foldable.sql"))
                .bind(&last_tx)
                .bind(last_id)
                .bind(&watermark)
                .fetch_optional(&mut *tx)
                .await?;
        }
        let Some((upper_tx, upper_id)) = upper else {
            return Ok(Some(0));
        };
        let folded: i64 = sqlx::query_scalar(include_str!("sql/postgres/rollup_fold.sql"))
            .bind(&last_tx)
            .bind(last_id)
            .bind(&upper_tx)
            .bind(upper_id)
            .fetch_one(&mut *tx)
            .await?;
        if !walk && folded > i64::from(max_entries) {
            return Ok(None);
        }
        sqlx::query(
            "UPDATE rollup_cursor SET last_tx = $1::text::xid8, last_id = $2, updated_at = $3 WHERE name = 'rollup'",
        )
        .bind(&upper_tx)
        .bind(upper_id)
        .bind(Utc::now())
        .execute(&mut *tx)
        .await?;
        before_commit()?;
        tx.commit().await?;
        Ok(Some(u64::try_from(folded).unwrap_or(0)))
    }

    /// Connects to the database a `postgres://` URL names. One direct
    /// connection is tried first (`connect_once`, for at most
    /// [`CONNECT_TIMEOUT`]), so that a server that is down or out of reach
    /// fails at once with its cause rather than after the pool's wait; one
    /// that answers it is not ready yet (57P03) is waited for, at most
    /// [`START_WAIT`], and through a restart once it has answered so.
    pub async fn connect(url: &str, catalog: Arc<Catalog>) -> Result<Self, OpenError> {
        let options: PgConnectOptions = url.parse().map_err(|source| OpenError::PostgresUrl { source })?;
        // Consume's no-overshoot rests on READ COMMITTED (the total is read
        // after the lock, in a fresh snapshot): ask for it whatever the
        // database's default. The backslash escapes the space for `-c`.
        let options = options
            .application_name("tally")
            .options([("default_transaction_isolation", r"read\ committed")])
            .log_slow_statements(super::SLOW_STATEMENT_LEVEL, Duration::from_secs(1));
        wait_until_accepting(&options).await?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(POOL_ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await?;
        Ok(Self {
            pool,
            options,
            catalog,
            settled: SettledSums::default(),
            consume_groups: std::sync::OnceLock::new(),
            listing_proven: std::sync::Mutex::new(ProvenHorizon::default()),
        })
    }

    /// The pool (for benchmarks and tests that inspect the database).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// An override row with its account.
    fn override_from_row(&self, row: OverrideRow) -> (String, Override) {
        let decimals = self.catalog.decimals(&row.resource);
        let value = Override {
            limit: row.limit_amount.map(|minor| Amount::from_minor(minor, decimals)),
            resource: ResourceName::from_stored(row.resource),
            enforcement: row.enforcement.as_deref().and_then(Enforcement::parse),
            window: row.limit_window.as_deref().and_then(Window::parse),
            expires_at: row.expires_at,
            updated_at: row.updated_at,
        };
        (row.account, value)
    }

    /// [`Store::plans_and_override_changes`] on `conn`, in one round trip.
    async fn plans_and_override_changes_on(
        &self,
        conn: &mut sqlx::PgConnection,
        account: &AccountId,
    ) -> Result<(Vec<PlanAssignment>, Vec<OverrideChange>), sqlx::Error> {
        // One round trip: plan rows (kind 'p') then override changes (kind
        // 'o'), each in its order (plans by effective_at, changes as made).
        let rows: Vec<PlanOrOverrideRow> = sqlx::query_as(
            "SELECT 'p' AS kind, plan AS name, effective_at AS at, created_at AS stamp,
                    NULL::bigint AS limit_amount, NULL::text AS enforcement, NULL::text AS limit_window,
                    false AS removed, effective_at AS sort_at, id
               FROM account_plans WHERE account = $1
             UNION ALL
             SELECT 'o', resource, expires_at, changed_at, limit_amount, enforcement, limit_window,
                    removed, changed_at, id
               FROM account_override_history WHERE account = $1
             ORDER BY 1 DESC, 9, 10",
        )
        .bind(account.as_str())
        .fetch_all(&mut *conn)
        .await?;
        let mut plans = Vec::new();
        let mut changes = Vec::new();
        for row in rows {
            if row.kind == "p" {
                plans.push(PlanAssignment {
                    plan: row.name,
                    effective_at: row.at.unwrap_or_default(),
                    created_at: row.stamp,
                });
            } else {
                let (_, value) = self.override_from_row(OverrideRow {
                    account: String::new(),
                    resource: row.name,
                    limit_amount: row.limit_amount,
                    enforcement: row.enforcement,
                    limit_window: row.limit_window,
                    expires_at: row.at,
                    updated_at: row.stamp,
                });
                changes.push(OverrideChange {
                    value,
                    removed: row.removed,
                });
            }
        }
        Ok((plans, changes))
    }

    /// A history row: the change with its account.
    fn change_from_row(&self, history: OverrideHistoryRow) -> (String, OverrideChange) {
        let (account, value) = self.override_from_row(history.row);
        (
            account,
            OverrideChange {
                value,
                removed: history.removed,
            },
        )
    }

    /// What a consume under `entry`'s key answers when the key is already
    /// stored: the stored consume's replay, or 409 if `entry` differs from it.
    /// None while the key is free.
    async fn stored_consume(
        &self,
        conn: &mut sqlx::PgConnection,
        entry: &NewEntry,
    ) -> Result<Option<ConsumeResult>, StoreError> {
        let row: Option<EntryRow> = sqlx::query_as(&format!(
            "SELECT {ENTRY_COLUMNS} FROM entries WHERE account = $1 AND idempotency_key = $2"
        ))
        .bind(entry.account.as_str())
        .bind(entry.idempotency_key.as_str())
        .fetch_optional(&mut *conn)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let response = sqlx::query_scalar(OUTCOME_SQL)
            .bind(row.id)
            .fetch_one(&mut *conn)
            .await?;
        replay(entry, &self.entry_from_row(row), response).map(Some)
    }

    fn entry_from_row(&self, row: EntryRow) -> Entry {
        let decimals = self.catalog.decimals(&row.resource);
        Entry {
            id: row.id,
            account: AccountId::from_stored(row.account),
            resource: ResourceName::from_stored(row.resource),
            amount: Amount::from_minor(row.amount, decimals),
            occurred_at: row.occurred_at,
            recorded_at: row.recorded_at,
            idempotency_key: IdempotencyKey::from_stored(row.idempotency_key),
            source: row.source,
            metadata: row.metadata,
            reverses: row.reverses,
        }
    }
}

/// A batch as the column arrays `UNNEST` takes, in insertion order.
struct Columns<'a> {
    accounts: Vec<&'a str>,
    resources: Vec<&'a str>,
    amounts: Vec<i64>,
    occurred: Vec<DateTime<Utc>>,
    keys: Vec<&'a str>,
    sources: Vec<Option<&'a str>>,
    metadata: Vec<Option<&'a str>>,
    reverses: Vec<Option<i64>>,
    recorded_at: DateTime<Utc>,
}

impl<'a> Columns<'a> {
    fn of(entries: impl Iterator<Item = &'a NewEntry>, len: usize) -> Self {
        let mut columns = Columns {
            accounts: Vec::with_capacity(len),
            resources: Vec::with_capacity(len),
            amounts: Vec::with_capacity(len),
            occurred: Vec::with_capacity(len),
            keys: Vec::with_capacity(len),
            sources: Vec::with_capacity(len),
            metadata: Vec::with_capacity(len),
            reverses: Vec::with_capacity(len),
            recorded_at: Utc::now(),
        };
        for e in entries {
            columns.accounts.push(e.account.as_str());
            columns.resources.push(e.resource.as_str());
            columns.amounts.push(e.amount.minor());
            columns.occurred.push(e.occurred_at);
            columns.keys.push(e.idempotency_key.as_str());
            columns.sources.push(e.source.as_deref());
            columns.metadata.push(e.metadata.as_deref());
            columns.reverses.push(e.reverses);
        }
        columns
    }
}

/// The batch INSERT, followed by `$tail`. No ORDER BY and no join: rows go in
/// in array order (the lock order, see `insert_entries`).
macro_rules! insert_batch_sql {
    ($tail:literal) => {
        concat!(
            "INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key, source, metadata, reverses)
             SELECT account, resource, amount, occurred_at, $9, idempotency_key, source, metadata::jsonb, reverses
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::timestamptz[], $5::text[], $6::text[], $7::text[], $8::bigint[])
                  AS batch (account, resource, amount, occurred_at, idempotency_key, source, metadata, reverses)",
            $tail
        )
    };
}

/// Inserts the batch in one statement; the new ids (only the ids: see
/// [`ids_in_order`]). With `skip_existing`, rows whose (account, key) exists
/// are skipped (ON CONFLICT DO NOTHING); without, such a row fails the statement.
async fn insert_columns(
    conn: &mut sqlx::PgConnection,
    columns: &Columns<'_>,
    skip_existing: bool,
) -> Result<Vec<i64>, sqlx::Error> {
    let sql = if skip_existing {
        insert_batch_sql!(" ON CONFLICT (account, idempotency_key) DO NOTHING RETURNING id")
    } else {
        insert_batch_sql!(" RETURNING id")
    };
    sqlx::query_scalar(sql)
        .bind(&columns.accounts)
        .bind(&columns.resources)
        .bind(&columns.amounts)
        .bind(&columns.occurred)
        .bind(&columns.keys)
        .bind(&columns.sources)
        .bind(&columns.metadata)
        .bind(&columns.reverses)
        .bind(columns.recorded_at)
        .fetch_all(conn)
        .await
}

/// Maps the ids of a statement that inserted every row of the batch back to
/// the entries. The rows went in in array order (`order`), each taking the
/// identity sequence's next value, and a session's values only grow: so the
/// ascending ids follow `order`, whatever order RETURNING lists them in.
fn ids_in_order(entries: &[NewEntry], order: &[usize], mut ids: Vec<i64>) -> HashMap<(String, String), i64> {
    ids.sort_unstable();
    order
        .iter()
        .zip(ids)
        .map(|(&i, id)| (natural_key(&entries[i].account, &entries[i].idempotency_key), id))
        .collect()
}

/// Whether `e` is a duplicate (account, idempotency_key).
fn is_idempotency_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation() && db.constraint() == Some(IDEMPOTENCY_INDEX))
}

/// The stored outcome of a consume entry: on the row itself (migration 0005),
/// else in consume_outcomes (rows recorded before it); NULL: not a consume.
const OUTCOME_SQL: &str = "SELECT COALESCE(e.consume_outcome, o.response)
     FROM entries AS e LEFT JOIN consume_outcomes AS o ON o.entry_id = e.id
     WHERE e.id = $1";

/// The unique index on (account, idempotency_key) in the migrations.
const IDEMPOTENCY_INDEX: &str = "entries_idempotency";

#[derive(FromRow)]
struct EntryRow {
    id: i64,
    account: String,
    resource: String,
    amount: i64,
    occurred_at: DateTime<Utc>,
    recorded_at: DateTime<Utc>,
    idempotency_key: String,
    source: Option<String>,
    metadata: Option<serde_json::Value>,
    reverses: Option<i64>,
}

const ENTRY_COLUMNS: &str =
    "id, account, resource, amount, occurred_at, recorded_at, idempotency_key, source, metadata, reverses";

#[derive(FromRow)]
struct ApiKeyRow {
    id: i64,
    name: Option<String>,
    role: String,
    account: Option<String>,
    prefix: String,
    created_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
}

impl TryFrom<ApiKeyRow> for ApiKey {
    type Error = StoreError;

    fn try_from(row: ApiKeyRow) -> Result<Self, StoreError> {
        Ok(ApiKey {
            id: row.id,
            name: row.name,
            role: Role::parse(&row.role).map_err(|e| StoreError::Unexpected(format!("API key {}: {e}", row.id)))?,
            account: row.account.map(AccountId::from_stored),
            prefix: row.prefix,
            created_at: row.created_at,
            revoked_at: row.revoked_at,
        })
    }
}

impl PgStore {
    /// Refuses a database whose ledger holds transaction ids this cluster has
    /// not reached yet: a `pg_dump` restored into another cluster. Its new
    /// entries would sort below the rollup cursor, so they would count toward
    /// no quota, total or export, silently. The way out is to move the
    /// cluster's ids past the ledger's (docs/operations.md).
    async fn refuse_a_cluster_behind_the_ledger(&self) -> Result<(), OpenError> {
        let (newest, next): (Option<String>, String) =
            sqlx::query_as(include_str!("sql/postgres/ledger_transaction_ids.sql"))
                .fetch_one(&self.pool)
                .await
                .map_err(OpenError::LedgerTransactionId)?;
        let Some(newest) = newest else { return Ok(()) };
        let (newest, next): (u64, u64) = (newest.parse()?, next.parse()?);
        if newest < next {
            return Ok(());
        }
        Err(OpenError::ClusterBehindLedger { newest, next })
    }

    /// The settled sums, after this process's look at the count of `tally
    /// verify --repair` runs when one is due, read through `executor` (see
    /// [`SettledSums::noticing_repairs`]).
    async fn settled_sums<'c>(&self, executor: impl sqlx::PgExecutor<'c>) -> Result<&SettledSums, StoreError> {
        let count_repairs = || sqlx::query_scalar(COUNT_REPAIRS_SQL).fetch_one(executor);
        self.settled.noticing_repairs(count_repairs).await
    }
}

/// Stores a key; with `only_if_none`, only when the table holds no key at all.
async fn insert_api_key(
    executor: impl sqlx::PgExecutor<'_>,
    new: &NewApiKey,
    only_if_none: bool,
) -> Result<Option<ApiKeyRow>, StoreError> {
    Ok(sqlx::query_as(&format!(
        "INSERT INTO api_keys (name, role, account, key_hash, prefix, created_at)
         SELECT $1, $2, $3, $4, $5, $6 WHERE NOT $7 OR NOT EXISTS (SELECT 1 FROM api_keys)
         RETURNING {API_KEY_COLUMNS}"
    ))
    .bind(new.name.as_deref())
    .bind(new.role.as_str())
    .bind(new.account.as_ref().map(AccountId::as_str))
    .bind(&new.hash)
    .bind(&new.prefix)
    .bind(Utc::now())
    .bind(only_if_none)
    .fetch_optional(executor)
    .await?)
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    async fn migrate(&self) -> Result<(), OpenError> {
        let migrator = sqlx::migrate!("migrations/postgres");
        let mut conn = self.pool.acquire().await?;
        // to_regclass: no "relation does not exist" ERROR in the server's log.
        let table_exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
            .fetch_one(&mut *conn)
            .await?;
        super::run_migrations(&migrator, &mut *conn, table_exists).await?;
        // The entries listing relies on ids handed out in the order they are
        // taken, which a sequence caching ids per session breaks.
        let cached: Option<i64> = sqlx::query_scalar(
            "SELECT seqcache FROM pg_sequence WHERE seqrelid = pg_get_serial_sequence('entries', 'id')::regclass",
        )
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(cached) = cached.filter(|&c| c > 1) {
            tracing::warn!(
                cached,
                "the ledger's id sequence caches {cached} ids per session, so the entries listing can skip rows \
                 for a client paging with after_id; run ALTER TABLE entries ALTER COLUMN id SET CACHE 1"
            );
        }
        drop(conn);
        self.refuse_a_cluster_behind_the_ledger().await
    }

    async fn why_unreachable(&self) -> Option<String> {
        connect_once(&self.options, Duration::from_secs(1))
            .await
            .err()
            .map(|e| crate::telemetry::cause_chain(&e))
    }

    async fn close(&self) {
        // Each connection says goodbye (no "unexpected EOF" in the server's log).
        if tokio::time::timeout(super::CLOSE_WAIT, self.pool.close())
            .await
            .is_err()
        {
            tracing::warn!(
                "connections still in use after {} s; leaving them",
                super::CLOSE_WAIT.as_secs()
            );
        }
    }

    async fn insert_entries(&self, entries: &[NewEntry]) -> Result<Vec<InsertOutcome>, StoreError> {
        // A fixed lock order across concurrent batches (no deadlocks): rows go
        // in sorted by (account, idempotency_key), sorted here rather than by
        // an ORDER BY. A plain INSERT … SELECT FROM UNNEST (no join, no sort)
        // inserts in array order. The sort is stable, so of a key repeated in
        // the batch the first occurrence in request order is the one stored.
        // Byte order equals ORDER BY under the C collation; under another
        // collation it is still one total order that every batch follows.
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by(|&a, &b| {
            let (a, b) = (&entries[a], &entries[b]);
            (a.account.as_str(), a.idempotency_key.as_str()).cmp(&(b.account.as_str(), b.idempotency_key.as_str()))
        });
        let columns = Columns::of(order.iter().map(|&i| &entries[i]), entries.len());

        // First try: a plain INSERT. It does less work per row than ON
        // CONFLICT DO NOTHING (no pre-check of the unique index, no
        // speculative insertion to confirm), and when every key is new, the
        // usual case, it is all there is. A key already stored (a retry) or
        // repeated in the batch makes it fail on `entries_idempotency`: roll
        // back and take the general path below in a fresh transaction.
        let mut tx = self.pool.begin().await?;
        match insert_columns(&mut tx, &columns, false).await {
            Ok(ids) => {
                let created = ids_in_order(entries, &order, ids);
                let outcomes = resolve_outcomes(entries, &created, &HashMap::new())?;
                tx.commit().await?;
                return Ok(outcomes);
            }
            Err(e) if is_idempotency_violation(&e) => tx.rollback().await?,
            Err(e) => return Err(super::map_reversal_violation(e, entries)),
        }

        let mut tx = self.pool.begin().await?;
        // ON CONFLICT DO NOTHING also skips a key repeated inside this batch.
        let ids = insert_columns(&mut tx, &columns, true)
            .await
            .map_err(|e| super::map_reversal_violation(e, entries))?;
        let created: HashMap<(String, String), i64> = if ids.len() == entries.len() {
            ids_in_order(entries, &order, ids)
        } else if ids.is_empty() {
            HashMap::new()
        } else {
            // Some were skipped: ask which (account, key) each new id holds.
            let rows: Vec<(i64, String, String)> =
                sqlx::query_as("SELECT id, account, idempotency_key FROM entries WHERE id = ANY($1)")
                    .bind(&ids)
                    .fetch_all(&mut *tx)
                    .await?;
            rows.into_iter()
                .map(|(id, account, key)| ((account, key), id))
                .collect()
        };

        let mut existing = HashMap::new();
        if created.len() < entries.len() {
            let missing: Vec<&NewEntry> = entries
                .iter()
                .filter(|e| !created.contains_key(&natural_key(&e.account, &e.idempotency_key)))
                .collect();
            let missing_accounts: Vec<&str> = missing.iter().map(|e| e.account.as_str()).collect();
            let missing_keys: Vec<&str> = missing.iter().map(|e| e.idempotency_key.as_str()).collect();
            // A new statement under READ COMMITTED: it sees the rows of the
            // concurrent transactions our INSERT waited for.
            let rows: Vec<EntryRow> = sqlx::query_as(&format!(
                "SELECT {ENTRY_COLUMNS} FROM entries
                 WHERE (account, idempotency_key) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))"
            ))
            .bind(&missing_accounts)
            .bind(&missing_keys)
            .fetch_all(&mut *tx)
            .await?;
            for row in rows {
                let entry = self.entry_from_row(row);
                existing.insert(natural_key(&entry.account, &entry.idempotency_key), entry);
            }
        }
        // Decide before committing: a conflict anywhere rolls the whole batch back.
        let outcomes = resolve_outcomes(entries, &created, &existing)?;
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn holds_keys(&self, keys: &[(&AccountId, &IdempotencyKey)]) -> Result<Vec<bool>, StoreError> {
        let (accounts, idempotency_keys): (Vec<&str>, Vec<&str>) =
            keys.iter().map(|(a, k)| (a.as_str(), k.as_str())).unzip();
        let held: Vec<i64> = sqlx::query_scalar(
            "SELECT pair.i - 1 FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS pair(account, key, i)
             WHERE EXISTS (SELECT 1 FROM entries AS e
                           WHERE e.account = pair.account AND e.idempotency_key = pair.key)",
        )
        .bind(&accounts)
        .bind(&idempotency_keys)
        .fetch_all(&self.pool)
        .await?;
        Ok(super::flags_at(keys.len(), held))
    }

    async fn entry(&self, id: i64) -> Result<Entry, StoreError> {
        let row: Option<EntryRow> = sqlx::query_as(&format!("SELECT {ENTRY_COLUMNS} FROM entries WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| self.entry_from_row(r))
            .ok_or_else(|| StoreError::entry_not_found(id))
    }

    async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<Entry>, StoreError> {
        let after_id = filter.after_id.unwrap_or(0);
        let proven = self.proven_horizon().await?;
        // The page below the horizon already proven: when full, it needs no
        // wait; when a writer holds the rest back, it is what can be shown.
        let below_proven = if proven > after_id {
            self.entries_page(filter, after_id, proven).await?
        } else {
            Vec::new()
        };
        if below_proven.len() == filter.limit as usize {
            return Ok(below_proven);
        }
        match self.listing_horizon().await? {
            Horizon::Proven(horizon) => self.entries_page(filter, after_id, horizon).await,
            // A short page; the client comes back for the rest.
            Horizon::Stuck(busy) if below_proven.is_empty() => Err(busy),
            // Said in the log as the 503 is (review BO: the short page was
            // silent, though docs/api.md says the log names the writer).
            Horizon::Stuck(busy) => {
                tracing::warn!(error = %busy, "the entries listing answers a short page: {busy}");
                Ok(below_proven)
            }
        }
    }

    async fn create_api_key(&self, new: &NewApiKey) -> Result<ApiKey, StoreError> {
        let row = insert_api_key(&self.pool, new, false).await?;
        row.ok_or_else(|| StoreError::Unexpected("a key insert stored nothing".into()))?
            .try_into()
    }

    async fn api_key_by_hash(&self, hash: &str) -> Result<Option<ApiKey>, StoreError> {
        let row: Option<ApiKeyRow> = sqlx::query_as(&format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL"
        ))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn list_api_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        let rows: Vec<ApiKeyRow> = sqlx::query_as(&format!("SELECT {API_KEY_COLUMNS} FROM api_keys ORDER BY id"))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    async fn revoke_api_key(&self, id: i64) -> Result<ApiKey, StoreError> {
        let row: Option<ApiKeyRow> = sqlx::query_as(&format!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2 RETURNING {API_KEY_COLUMNS}"
        ))
        .bind(Utc::now())
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.ok_or_else(|| {
            StoreError::NotFound(format!("API key {id} does not exist; `tally keys list` shows the keys"))
        })?
        .try_into()
    }

    async fn create_first_api_key(&self, new: &NewApiKey) -> Result<Option<ApiKey>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Without the lock two processes could each see no key under READ
        // COMMITTED and each insert one; after it, the INSERT's snapshot sees
        // a key the other committed.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('tally: the first api key', 0))")
            .execute(&mut *tx)
            .await?;
        let row = insert_api_key(&mut *tx, new, true).await?;
        tx.commit().await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn rollup_batch(&self, max_entries: u32, before_commit: &BeforeCommit) -> Result<u64, StoreError> {
        if let Some(folded) = self.fold_batch(max_entries, false, before_commit).await? {
            return Ok(folded);
        }
        // The shortcut's batch came out larger than allowed (rows with ids
        // below the cursor's committed late) and was rolled back: walk.
        Ok(self.fold_batch(max_entries, true, before_commit).await?.unwrap_or(0))
    }

    async fn unfolded_estimate(&self) -> Result<u64, StoreError> {
        let backlog: i64 = sqlx::query_scalar(super::UNFOLDED_ESTIMATE_SQL)
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(backlog).unwrap_or(0))
    }

    fn rollup_batch_cap(&self) -> u32 {
        // Under MVCC a batch blocks no writer, and each batch costs about a
        // pass over the totals it touches, so a backlog is best folded in
        // few large batches. Ten million rows is about half a minute here;
        // the aggregate spills to disk past work_mem rather than growing memory.
        10_000_000
    }

    fn forget_settled_sums(&self) {
        self.settled.clear();
    }

    async fn ledger_has_resource(
        &self,
        account: Option<&AccountId>,
        resource: &ResourceName,
    ) -> Result<bool, StoreError> {
        // With an account, entries_unfolded_tail's (account, resource) prefix
        // answers; without, the first matching row ends the scan.
        let found = match account {
            Some(account) => {
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM entries WHERE account = $1 AND resource = $2)")
                    .bind(account.as_str())
                    .bind(resource.as_str())
                    .fetch_one(&self.pool)
                    .await?
            }
            None => {
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM entries WHERE resource = $1)")
                    .bind(resource.as_str())
                    .fetch_one(&self.pool)
                    .await?
            }
        };
        Ok(found)
    }

    async fn oldest_unfolded(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        // The first row past the cursor in commit order: close to the oldest
        // unfolded one without scanning the whole tail.
        Ok(sqlx::query_scalar(
            "SELECT e.recorded_at FROM entries AS e, rollup_cursor AS c
             WHERE c.name = 'rollup' AND (e.tx_id, e.id) > (c.last_tx, c.last_id)
             ORDER BY e.tx_id, e.id LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn committed_so_far(&self) -> Result<CommittedMark, StoreError> {
        let snapshot: String = sqlx::query_scalar("SELECT pg_current_snapshot()::text")
            .fetch_one(&self.pool)
            .await?;
        Ok(CommittedMark::Snapshot(snapshot))
    }

    async fn oldest_unfolded_by(&self, mark: &CommittedMark) -> Result<Option<DateTime<Utc>>, StoreError> {
        let CommittedMark::Snapshot(snapshot) = mark else {
            return Err(StoreError::Unexpected(format!(
                "a PostgreSQL ledger was given {mark:?}"
            )));
        };
        // Past the cursor, the rows the snapshot saw as committed; none of
        // them has a transaction id at or above its xmax, which bounds the
        // index range.
        Ok(sqlx::query_scalar(
            "SELECT min(e.recorded_at) FROM entries AS e, rollup_cursor AS c
             WHERE c.name = 'rollup' AND (e.tx_id, e.id) > (c.last_tx, c.last_id)
               AND e.tx_id < pg_snapshot_xmax($1::text::pg_snapshot)
               AND pg_visible_in_snapshot(e.tx_id, $1::text::pg_snapshot)",
        )
        .bind(snapshot)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn bucket_totals(
        &self,
        account: &AccountId,
        resource: &ResourceName,
        granularity: Granularity,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<(NaiveDate, i64)>, StoreError> {
        let sql = match granularity {
            Granularity::Day => include_str!("sql/postgres/bucket_totals_day.sql"),
            Granularity::Month => include_str!("sql/postgres/bucket_totals_month.sql"),
        };
        let rows: Vec<(NaiveDate, String)> = sqlx::query_as(sql)
            .bind(account.as_str())
            .bind(resource.as_str())
            .bind(from)
            .bind(to)
            .bind(start_of(from))
            .bind(start_of(to))
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|(bucket, amount)| {
                export::total_minor_units(&amount, account.as_str(), resource.as_str(), bucket)
                    .map(|amount| (bucket, amount))
            })
            .collect()
    }

    async fn verify_totals(&self) -> Result<Vec<TotalMismatch>, StoreError> {
        // REPEATABLE READ: all four reads see one snapshot, even while a rollup runs.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let mismatches = totals_against_ledger(&mut tx).await?;
        tx.rollback().await?;
        Ok(mismatches)
    }

    async fn repair_totals(&self) -> Result<Vec<TotalMismatch>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The rollup's own lock, held to commit: no batch moves the cursor or
        // a total meanwhile, so the reads below (each its own snapshot under
        // READ COMMITTED) agree with each other and with the rewrite.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(ROLLUP_LOCK_KEY)
            .execute(&mut *tx)
            .await?;
        let mismatches = totals_against_ledger(&mut tx).await?;
        for mismatch in &mismatches {
            let (table, column) = match mismatch.granularity() {
                Granularity::Day => ("daily_totals", "day"),
                Granularity::Month => ("monthly_totals", "month"),
            };
            let Some((amount, entries)) = mismatch.expected else {
                sqlx::query(&format!(
                    "DELETE FROM {table} WHERE account = $1 AND resource = $2 AND {column} = $3"
                ))
                .bind(&mismatch.account)
                .bind(&mismatch.resource)
                .bind(mismatch.bucket)
                .execute(&mut *tx)
                .await?;
                continue;
            };
            // The amount as text: NUMERIC holds it exactly past 64 bits.
            sqlx::query(&format!(
                "INSERT INTO {table} (account, resource, {column}, amount, entries)
                 VALUES ($1, $2, $3, $4::numeric, $5)
                 ON CONFLICT (account, resource, {column})
                 DO UPDATE SET amount = EXCLUDED.amount, entries = EXCLUDED.entries"
            ))
            .bind(&mismatch.account)
            .bind(&mismatch.resource)
            .bind(mismatch.bucket)
            .bind(amount.to_string())
            .bind(entries)
            .execute(&mut *tx)
            .await?;
        }
        if !mismatches.is_empty() {
            // Counted with the rewrite: every process forgets the settled
            // sums it read from the old totals (store/settled.rs).
            sqlx::query(COUNT_A_REPAIR_SQL).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        // This process need not wait for its next look at the count.
        self.forget_settled_sums();
        Ok(mismatches)
    }

    async fn totals_past_64_bits(&self) -> Result<Vec<TotalName>, StoreError> {
        // Totals are NUMERIC (migration 0011): compare with BIGINT's range.
        let rows: Vec<(String, String, String, NaiveDate)> = sqlx::query_as(
            "SELECT 'day', account, resource, day FROM daily_totals
              WHERE amount NOT BETWEEN -9223372036854775808 AND 9223372036854775807
             UNION ALL
             SELECT 'month', account, resource, month FROM monthly_totals
              WHERE amount NOT BETWEEN -9223372036854775808 AND 9223372036854775807
             ORDER BY 1, 2, 3, 4",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(table, account, resource, bucket)| TotalName {
                granularity: if table == "day" {
                    Granularity::Day
                } else {
                    Granularity::Month
                },
                account,
                resource,
                bucket,
            })
            .collect())
    }

    async fn try_job_lock(&self, job: &str) -> Result<Option<JobLock>, StoreError> {
        // A session lock on a connection of its own, detached from the pool: if
        // this process dies, the connection closes and the lock goes with it.
        let mut conn = self.pool.acquire().await?.detach();
        let key: i64 = sqlx::query_scalar("SELECT hashtextextended('tally.job.' || $1, 0)")
            .bind(job)
            .fetch_one(&mut conn)
            .await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut conn)
            .await?;
        if locked {
            Ok(Some(JobLock::postgres(conn, key)))
        } else {
            let _ = sqlx::Connection::close(conn).await;
            Ok(None)
        }
    }

    async fn assign_plan(
        &self,
        account: &AccountId,
        plan: &str,
        effective_at: DateTime<Utc>,
    ) -> Result<PlanAssignment, StoreError> {
        let (effective_at, created_at): (DateTime<Utc>, DateTime<Utc>) = sqlx::query_as(
            "INSERT INTO account_plans (account, plan, effective_at, created_at) VALUES ($1, $2, $3, $4)
             RETURNING effective_at, created_at",
        )
        .bind(account.as_str())
        .bind(plan)
        .bind(effective_at)
        // This process's clock, as every stamp (migration 0019 says why).
        .bind(Utc::now())
        .fetch_one(&self.pool)
        .await?;
        Ok(PlanAssignment {
            plan: plan.to_owned(),
            effective_at,
            created_at,
        })
    }

    async fn recorded_default_plan(&self) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(super::LAST_DEFAULT_PLAN)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn recorded_digits(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(sqlx::query_as("SELECT resource, digits::bigint FROM resource_digits")
            .fetch_all(&self.pool)
            .await?)
    }

    async fn holds_amounts_of(&self, resource: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM entries WHERE resource = $1)
                 OR EXISTS (SELECT 1 FROM account_override_history WHERE resource = $1)",
        )
        .bind(resource)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn record_digits(&self, digits: &[(String, u32)], replace: bool) -> Result<(), StoreError> {
        let on_conflict = super::digits_on_conflict(replace);
        let (resources, digits): (Vec<&str>, Vec<i32>) = digits
            .iter()
            .map(|(resource, digits)| (resource.as_str(), i32::try_from(*digits).unwrap_or(i32::MAX)))
            .unzip();
        sqlx::query(&format!(
            "INSERT INTO resource_digits (resource, digits, recorded_at)
             SELECT resource, digits, $3 FROM unnest($1::text[], $2::int[]) AS r(resource, digits) {on_conflict}"
        ))
        .bind(&resources)
        .bind(&digits)
        .bind(Utc::now())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn record_default_plan(&self, catalog: &Catalog) -> Result<Option<DefaultPlanChange>, StoreError> {
        let default = catalog.default_plan.as_str();
        // Looked at first without a lock: on every open but the one after a
        // change this is all, and it needs no write access.
        if self.recorded_default_plan().await?.as_deref() == Some(default) {
            return Ok(None);
        }
        let mut tx = self.pool.begin().await?;
        // One instant for the change's rows, by this process's clock.
        let now = Utc::now();
        // Self-exclusive: two processes opening with a new default record
        // (and assign) once; posts and consumes are not held up.
        sqlx::query("LOCK TABLE default_plans IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        let last: Option<String> = sqlx::query_scalar(super::LAST_DEFAULT_PLAN)
            .fetch_optional(&mut *tx)
            .await?;
        if last.as_deref() == Some(default) {
            return Ok(None);
        }
        // The first record assigns nothing: what the default was before is
        // not known.
        let kept = match &last {
            Some(previous) if catalog.plans.contains_key(previous) => {
                let assigned = sqlx::query(include_str!("sql/postgres/keep_the_previous_default_plan.sql"))
                    .bind(previous)
                    .bind(from_the_start())
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                Some(assigned.rows_affected())
            }
            _ => None,
        };
        let change = DefaultPlanChange {
            from: last,
            to: default.to_owned(),
            kept,
        };
        sqlx::query("INSERT INTO default_plans (plan, recorded_at) VALUES ($1, $2)")
            .bind(default)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(change))
    }

    async fn plan_history(&self, account: &AccountId) -> Result<Vec<PlanAssignment>, StoreError> {
        let rows: Vec<(String, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
            "SELECT plan, effective_at, created_at FROM account_plans WHERE account = $1 ORDER BY effective_at, id",
        )
        .bind(account.as_str())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(plan, effective_at, created_at)| PlanAssignment {
                plan,
                effective_at,
                created_at,
            })
            .collect())
    }

    async fn plans_in_force(&self, at: DateTime<Utc>) -> Result<Vec<(String, i64)>, StoreError> {
        // The assignment in force at `at` is the one a consume would pick
        // (tally_consume_group: latest effective_at, then created_at, then id).
        Ok(sqlx::query_as(
            "SELECT ap.plan, COUNT(DISTINCT ap.account)
               FROM account_plans AS ap
              -- A later assignment, unless another made after it takes
              -- effect at the same instant (it wins the tie, so this one
              -- never takes effect); or the one in force now.
              WHERE (ap.effective_at > $1
                     AND NOT EXISTS (SELECT 1 FROM account_plans AS y
                                      WHERE y.account = ap.account AND y.effective_at = ap.effective_at
                                        AND (y.created_at, y.id) > (ap.created_at, ap.id)))
                 OR ap.id = (SELECT x.id FROM account_plans AS x
                              WHERE x.account = ap.account AND x.effective_at <= $1
                              ORDER BY x.effective_at DESC, x.created_at DESC, x.id DESC LIMIT 1)
              GROUP BY ap.plan
              ORDER BY ap.plan",
        )
        .bind(at)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn put_override(&self, account: &AccountId, value: &Override) -> Result<(), StoreError> {
        // One statement: the change and its history row land together.
        sqlx::query(
            "WITH changed AS (
                INSERT INTO account_overrides (account, resource, limit_amount, enforcement, limit_window, expires_at, updated_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7)
                ON CONFLICT (account, resource) DO UPDATE SET
                   limit_amount = excluded.limit_amount, enforcement = excluded.enforcement,
                   limit_window = excluded.limit_window, expires_at = excluded.expires_at, updated_at = excluded.updated_at
                RETURNING account, resource, limit_amount, enforcement, limit_window, expires_at, updated_at
             )
             INSERT INTO account_override_history
                 (account, resource, limit_amount, enforcement, limit_window, expires_at, changed_at, removed)
             SELECT account, resource, limit_amount, enforcement, limit_window, expires_at, updated_at, false FROM changed",
        )
        .bind(account.as_str())
        .bind(value.resource.as_str())
        .bind(value.limit.map(Amount::minor))
        .bind(value.enforcement.map(Enforcement::as_str))
        .bind(value.window.map(Window::as_str))
        .bind(value.expires_at)
        .bind(value.updated_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn delete_override(
        &self,
        account: &AccountId,
        resource: &ResourceName,
        removed_at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        // One statement: the removal and its history row land together; the
        // history insert counts the rows removed.
        let done = sqlx::query(
            "WITH removed AS (
                DELETE FROM account_overrides WHERE account = $1 AND resource = $2 RETURNING account, resource
             )
             INSERT INTO account_override_history (account, resource, changed_at, removed)
             SELECT account, resource, $3, true FROM removed",
        )
        .bind(account.as_str())
        .bind(resource.as_str())
        .bind(removed_at)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn plans_and_override_changes(
        &self,
        account: &AccountId,
    ) -> Result<(Vec<PlanAssignment>, Vec<OverrideChange>), StoreError> {
        let mut conn = self.pool.acquire().await?;
        Ok(self.plans_and_override_changes_on(&mut conn, account).await?)
    }

    async fn check_inputs(
        &self,
        account: &AccountId,
        resource: &ResourceName,
        likely: &Period,
    ) -> Result<CheckInputs, StoreError> {
        // One statement, so one snapshot (and one round trip, but for the
        // look at the repairs count once a second): `used` (from the settled
        // watermark, see used_on) beside the plan history and the overrides
        // as arrays.
        let lookup = self
            .settled_sums(&self.pool)
            .await?
            .get(account.as_str(), resource.as_str(), bounds(likely));
        let row: CheckRow = sqlx::query_as(
            "SELECT u.used, u.mark, u.settled, p.names, p.effective, p.created,
                    o.resources, o.limits, o.enforcements, o.windows, o.expires, o.updated, o.removed
               FROM tally_used_settled($1, $2, $3, $4,
                        COALESCE($5::timestamptz, '-infinity'), COALESCE($6::timestamptz, 'infinity'), $7, $8) AS u,
                    LATERAL (SELECT array_agg(plan ORDER BY effective_at, id) AS names,
                                    array_agg(effective_at ORDER BY effective_at, id) AS effective,
                                    array_agg(created_at ORDER BY effective_at, id) AS created
                               FROM account_plans WHERE account = $1) AS p,
                    LATERAL (SELECT array_agg(resource ORDER BY changed_at, id) AS resources,
                                    array_agg(limit_amount ORDER BY changed_at, id) AS limits,
                                    array_agg(enforcement ORDER BY changed_at, id) AS enforcements,
                                    array_agg(limit_window ORDER BY changed_at, id) AS windows,
                                    array_agg(expires_at ORDER BY changed_at, id) AS expires,
                                    array_agg(changed_at ORDER BY changed_at, id) AS updated,
                                    array_agg(removed ORDER BY changed_at, id) AS removed
                               FROM account_override_history WHERE account = $1) AS o",
        )
        .bind(account.as_str())
        .bind(resource.as_str())
        .bind(window_table(likely.window))
        .bind(likely.start)
        .bind(likely.starts_at())
        .bind(likely.ends_at())
        .bind(lookup.known.map(|k| k.mark))
        .bind(lookup.known.map(|k| k.sum))
        .fetch_one(&self.pool)
        .await
        .map_err(|e| StoreError::from(e).naming_used(account, resource))?;
        self.settled.offer(
            account.as_str(),
            resource.as_str(),
            bounds(likely),
            Settled {
                mark: row.mark,
                sum: row.settled,
            },
            lookup.epoch,
        );
        let plans = row
            .names
            .unwrap_or_default()
            .into_iter()
            .zip(row.effective.unwrap_or_default())
            .zip(row.created.unwrap_or_default())
            .map(|((plan, effective_at), created_at)| PlanAssignment {
                plan,
                effective_at,
                created_at,
            })
            .collect();
        let resources = row.resources.unwrap_or_default();
        let n = resources.len();
        let mut limits = row.limits.unwrap_or_default().into_iter();
        let mut enforcements = row.enforcements.unwrap_or_default().into_iter();
        let mut windows = row.windows.unwrap_or_default().into_iter();
        let mut expires = row.expires.unwrap_or_default().into_iter();
        let mut updated = row.updated.unwrap_or_default().into_iter();
        let mut removed = row.removed.unwrap_or_default().into_iter();
        let mut override_changes = Vec::with_capacity(n);
        for resource in resources {
            let (_, value) = self.override_from_row(OverrideRow {
                account: String::new(),
                resource,
                limit_amount: limits.next().flatten(),
                enforcement: enforcements.next().flatten(),
                limit_window: windows.next().flatten(),
                expires_at: expires.next().flatten(),
                updated_at: updated.next().unwrap_or_default(),
            });
            override_changes.push(OverrideChange {
                value,
                removed: removed.next().unwrap_or_default(),
            });
        }
        Ok(CheckInputs {
            plans,
            override_changes,
            used: row.used,
        })
    }

    async fn consume_decided(
        &self,
        entry: &NewEntry,
        rules: ConsumeRules,
        now: DateTime<Utc>,
    ) -> Result<Option<DecidedConsume>, StoreError> {
        let likely = bounds(&rules.likely_period);
        let lookup = self
            .settled_sums(&self.pool)
            .await?
            .get(entry.account.as_str(), entry.resource.as_str(), likely);
        // Decided with the consumes waiting beside it: one call, one
        // transaction, one commit for all of them (see consume_group).
        let row = self
            .consume_groups
            .get_or_init(|| ConsumeGroups::start(&self.pool))
            .decide(consume_group::Request {
                entry: entry.clone(),
                rules,
                likely,
                known: lookup.known,
                epoch: lookup.epoch,
                now: entry.occurred_at_given.then_some(now),
            })
            .await?;
        if let (Some(mark), Some(sum)) = (row.mark, row.settled) {
            self.settled.offer(
                entry.account.as_str(),
                entry.resource.as_str(),
                (row.period_start, row.period_end),
                Settled { mark, sum },
                lookup.epoch,
            );
        }
        let decided = match (row.outcome.as_str(), row.entry_id, row.used, row.context) {
            ("recorded", Some(entry_id), _, Some(context)) => DecidedConsume::Recorded { entry_id, context },
            ("rejected", _, Some(used), Some(context)) => DecidedConsume::Rejected {
                used,
                context,
                in_force_now: false,
            },
            ("rejected_now", _, Some(used), Some(context)) => DecidedConsume::Rejected {
                used,
                context,
                in_force_now: true,
            },
            // Held to two windows' limits: the multi-statement path reads both.
            ("undecided", ..) => return Ok(None),
            // `conflict`: the key was taken by a concurrent request that does
            // not take the consume lock (a posted entry); the insert waited
            // for it to commit, so this later read sees it: answered as a
            // replay of it, as if the consume had come a moment later.
            ("replayed", Some(_), _, _) | ("conflict", ..) => {
                let mut conn = self.pool.acquire().await?;
                let stored = self.stored_consume(&mut conn, entry).await?;
                DecidedConsume::Replayed(stored.ok_or_else(|| StoreError::key_taken(None))?)
            }
            (other, ..) => {
                return Err(StoreError::Unexpected(format!(
                    "tally_consume_group answered an outcome this version does not know: {other:?}"
                )));
            }
        };
        Ok(Some(decided))
    }

    async fn used(&self, account: &AccountId, resource: &ResourceName, period: &Period) -> Result<i64, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let settled = self.settled_sums(&mut *conn).await?;
        used_on(&mut conn, settled, account, resource, period).await
    }

    async fn used_resources(&self, account: &AccountId) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT resource FROM monthly_totals WHERE account = $1
             UNION
             SELECT e.resource FROM entries AS e, rollup_cursor AS c
             WHERE c.name = 'rollup' AND e.account = $1 AND (e.tx_id, e.id) > (c.last_tx, c.last_id)
             ORDER BY 1",
        )
        .bind(account.as_str())
        .fetch_all(&self.pool)
        .await?)
    }

    async fn consume(&self, entry: &NewEntry, decide: &dyn ConsumeDecider) -> Result<ConsumeResult, StoreError> {
        let mut tx = self.pool.begin().await?;
        // One lock per (account, resource), held to commit. Under READ
        // COMMITTED the `used` read below starts after the lock is granted, so
        // it sees every consume that committed before us: no overshoot.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(31) || $2, 7))")
            .bind(entry.account.as_str())
            .bind(entry.resource.as_str())
            .execute(&mut *tx)
            .await?;
        if let Some(replayed) = self.stored_consume(&mut tx, entry).await? {
            return Ok(replayed);
        }
        // The limits too are read after the lock: a plan or override committed
        // before it was granted applies to this consume. So is a look at the
        // repairs count, when due: a repair this consume waited for counts.
        // In a savepoint: a role refused the count goes on without the sums,
        // and the refused statement must not abort this transaction.
        let settled = self
            .settled
            .noticing_repairs(|| count_repairs_in_a_savepoint(&mut tx))
            .await?;
        let (plans, overrides) = self.plans_and_override_changes_on(&mut tx, &entry.account).await?;
        let mut used = Vec::with_capacity(2);
        for period in decide.periods(&plans, &overrides) {
            used.push(used_on(&mut tx, settled, &entry.account, &entry.resource, &period).await?);
        }
        let response = match decide.decide(&plans, &overrides, &used) {
            Ok(response) => response,
            Err(reason) => return Ok(ConsumeResult::Rejected { reason }),
        };
        // The entry and its response in one row (entries.consume_outcome,
        // migration 0005): one round trip less while the lock is held.
        let entry_id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key, source, metadata,
                                  reverses, consume_outcome)
             VALUES ($1, $2, $3, $4, $10, $5, $6, $7::jsonb, $8, $9)
             ON CONFLICT (account, idempotency_key) DO NOTHING
             RETURNING id",
        )
        .bind(entry.account.as_str())
        .bind(entry.resource.as_str())
        .bind(entry.amount.minor())
        .bind(entry.occurred_at)
        .bind(entry.idempotency_key.as_str())
        .bind(entry.source.as_deref())
        .bind(entry.metadata.as_deref())
        .bind(entry.reverses)
        .bind(&response)
        .bind(Utc::now())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(entry_id) = entry_id else {
            // Taken by a posted entry (posting takes no consume lock) that the
            // insert waited for: a new statement under READ COMMITTED sees it,
            // and this consume answers as its replay, writing nothing.
            let stored = self.stored_consume(&mut tx, entry).await?;
            return stored.ok_or_else(|| StoreError::key_taken(None));
        };
        // Dropping the transaction rolls the row back.
        if let Err(reason) = decide.charge_rate(&plans) {
            return Ok(ConsumeResult::Rejected { reason });
        }
        tx.commit().await?;
        Ok(ConsumeResult::Recorded { entry_id, response })
    }

    async fn export_entries(&self, filter: &ExportFilter, sink: &mut dyn CsvSink) -> Result<u64, StreamError> {
        export::entries(&self.pool, &self.catalog, filter, sink).await
    }

    async fn export_totals(
        &self,
        granularity: Granularity,
        filter: &ExportFilter,
        sink: &mut dyn CsvSink,
    ) -> Result<u64, StreamError> {
        export::totals(&self.pool, &self.catalog, granularity, filter, sink).await
    }

    fn stream_totals<'a>(
        &'a self,
        granularity: Granularity,
        filter: &'a ExportFilter,
    ) -> BoxStream<'a, Result<TotalRow, StoreError>> {
        static SQL: LazyLock<[String; 4]> = LazyLock::new(|| {
            let live = include_str!("sql/postgres/export_totals.sql");
            let as_of = include_str!("sql/postgres/export_totals_as_of.sql");
            let [day, month] = [Granularity::Day, Granularity::Month].map(export::shape);
            [
                totals_sql(live, day.0, day.1, day.2),
                totals_sql(live, month.0, month.1, month.2),
                totals_sql(as_of, day.0, day.1, day.2),
                totals_sql(as_of, month.0, month.1, month.2),
            ]
        });
        let index = usize::from(granularity == Granularity::Month) + 2 * usize::from(filter.as_of.is_some());
        let rows = sqlx::query_as::<_, (String, String, NaiveDate, String, i64)>(SQL[index].as_str())
            .bind(filter.from)
            .bind(filter.to)
            .bind(filter.account.as_ref().map(|a| a.as_str().to_owned()))
            .bind(filter.resource.as_ref().map(|r| r.as_str().to_owned()))
            .bind(start_of(filter.from))
            .bind(start_of(filter.to))
            .bind(filter.as_of)
            .fetch(&self.pool);
        Box::pin(rows.map(|row| {
            let (account, resource, bucket, amount, entries) = row?;
            Ok(TotalRow {
                amount: export::total_minor_units(&amount, &account, &resource, bucket)?,
                account,
                resource,
                bucket,
                entries,
            })
        }))
    }

    async fn all_plan_assignments(&self) -> Result<Vec<(String, PlanAssignment)>, StoreError> {
        let rows: Vec<(String, String, DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
            "SELECT account, plan, effective_at, created_at FROM account_plans ORDER BY account, effective_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(account, plan, effective_at, created_at)| {
                (
                    account,
                    PlanAssignment {
                        plan,
                        effective_at,
                        created_at,
                    },
                )
            })
            .collect())
    }

    async fn override_history(
        &self,
        as_of: Option<DateTime<Utc>>,
    ) -> Result<Vec<(String, OverrideChange)>, StoreError> {
        let rows: Vec<OverrideHistoryRow> = sqlx::query_as(include_str!("sql/postgres/override_history.sql"))
            .bind(as_of)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.into_iter().map(|history| self.change_from_row(history)).collect())
    }
}

/// Totals read for `verify` with their amount as NUMERIC text (sums past 64
/// bits included), in 128 bits.
fn wide(rows: Vec<(String, String, NaiveDate, String, i64)>) -> Result<Vec<VerifiedTotal>, StoreError> {
    rows.into_iter()
        .map(|(account, resource, bucket, amount, entries)| {
            let amount = amount.parse().map_err(|_| {
                StoreError::Unexpected(format!(
                    "the database holds a total of {amount:?} for {account} / {resource} / {bucket}, not a whole \
                     number of minor units"
                ))
            })?;
            Ok((account, resource, bucket, amount, entries))
        })
        .collect()
}

/// Every daily and monthly total against its folded ledger rows, read in the
/// caller's transaction.
async fn totals_against_ledger(conn: &mut sqlx::PgConnection) -> Result<Vec<TotalMismatch>, StoreError> {
    let mut mismatches = Vec::new();
    for (table, expected_sql, actual_sql) in [
        (
            "daily",
            include_str!("sql/postgres/verify_daily.sql"),
            // trunc: a whole amount written by hand as 125.00 prints so
            // (migration 0013 keeps amounts whole, not their scale 0).
            "SELECT account, resource, day, trunc(amount)::text, entries FROM daily_totals",
        ),
        (
            "monthly",
            include_str!("sql/postgres/verify_monthly.sql"),
            "SELECT account, resource, month, trunc(amount)::text, entries FROM monthly_totals",
        ),
    ] {
        let expected = sqlx::query_as(expected_sql).fetch_all(&mut *conn).await?;
        let actual = sqlx::query_as(actual_sql).fetch_all(&mut *conn).await?;
        mismatches.extend(diff_totals(table, wide(expected)?, wide(actual)?));
    }
    Ok(mismatches)
}

/// The advisory lock key that serialises rollup batches.
const ROLLUP_LOCK_KEY: i64 = 0x7461_6c6c_7972_6f6c; // "tallyrol"

/// How far the entries listing may read (`PgStore::listing_horizon`).
enum Horizon {
    /// Every id up to this one is committed or rolled back, for good.
    Proven(i64),
    /// A writer stayed open too long to wait for; the error names it.
    Stuck(StoreError),
}

/// How long an entries listing waits for writing transactions to end (see
/// `PgStore::listing_horizon`).
const LISTING_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Minor units used in `period`, read on `conn` in one statement (one
/// snapshot), from the settled watermark when one is known; the new watermark
/// is remembered. See [`super::settled`] and `tally_used_settled` (migration
/// 0005) for why this is exact.
async fn used_on(
    conn: &mut sqlx::PgConnection,
    settled: &SettledSums,
    account: &AccountId,
    resource: &ResourceName,
    period: &Period,
) -> Result<i64, StoreError> {
    let table = window_table(period.window);
    let lookup = settled.get(account.as_str(), resource.as_str(), bounds(period));
    let (used, mark, sum): (i64, i64, i64) = sqlx::query_as(
        "SELECT used, mark, settled FROM tally_used_settled($1, $2, $3, $4,
             COALESCE($5::timestamptz, '-infinity'), COALESCE($6::timestamptz, 'infinity'), $7, $8)",
    )
    .bind(account.as_str())
    .bind(resource.as_str())
    .bind(table)
    .bind(period.start)
    .bind(period.starts_at())
    .bind(period.ends_at())
    .bind(lookup.known.map(|k| k.mark))
    .bind(lookup.known.map(|k| k.sum))
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| StoreError::from(e).naming_used(account, resource))?;
    settled.offer(
        account.as_str(),
        resource.as_str(),
        bounds(period),
        Settled { mark, sum },
        lookup.epoch,
    );
    Ok(used)
}

/// The count of `tally verify --repair` runs ([`COUNT_REPAIRS_SQL`]), read
/// inside the transaction on `conn` in a savepoint of its own: a refused read
/// (a role granted before migration 0022) rolls back to the savepoint, and
/// the transaction goes on.
async fn count_repairs_in_a_savepoint(conn: &mut sqlx::PgConnection) -> Result<i64, sqlx::Error> {
    let mut savepoint = sqlx::Connection::begin(conn).await?;
    let count = sqlx::query_scalar(COUNT_REPAIRS_SQL).fetch_one(&mut *savepoint).await;
    if count.is_ok() {
        savepoint.commit().await?;
    } else {
        savepoint.rollback().await?;
    }
    count
}

/// The `p_table` argument of tally_used_settled for a window.
fn window_table(window: Window) -> &'static str {
    match window {
        Window::Day => "day",
        Window::Month => "month",
        Window::Total => "total",
    }
}

/// What `check_inputs` reads: used and the watermark, plan history and
/// override changes as parallel arrays (NULL when the account has none).
#[derive(FromRow)]
struct CheckRow {
    used: i64,
    mark: i64,
    settled: i64,
    names: Option<Vec<String>>,
    effective: Option<Vec<DateTime<Utc>>>,
    created: Option<Vec<DateTime<Utc>>>,
    resources: Option<Vec<String>>,
    limits: Option<Vec<Option<i64>>>,
    enforcements: Option<Vec<Option<String>>>,
    windows: Option<Vec<Option<String>>>,
    expires: Option<Vec<Option<DateTime<Utc>>>>,
    updated: Option<Vec<DateTime<Utc>>>,
    removed: Option<Vec<bool>>,
}

/// A row of `plans_and_override_changes_on`: a plan assignment ('p') or an
/// override change ('o').
#[derive(FromRow)]
struct PlanOrOverrideRow {
    kind: String,
    name: String,
    /// effective_at of a plan, expires_at of an override change.
    at: Option<DateTime<Utc>>,
    /// created_at of a plan, changed_at of an override change.
    stamp: DateTime<Utc>,
    limit_amount: Option<i64>,
    enforcement: Option<String>,
    limit_window: Option<String>,
    /// Whether an override change removed it (false for a plan).
    removed: bool,
}

#[derive(FromRow)]
struct OverrideRow {
    account: String,
    resource: String,
    limit_amount: Option<i64>,
    enforcement: Option<String>,
    limit_window: Option<String>,
    expires_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
}

/// One row of `account_override_history`: an override as set, or its removal.
#[derive(FromRow)]
struct OverrideHistoryRow {
    #[sqlx(flatten)]
    row: OverrideRow,
    removed: bool,
}
