//! The SQLite store: the embedded default.
//!
//! WAL mode with a busy timeout; one writer connection (SQLite has one writer
//! anyway, and queueing in-process beats spinning on SQLITE_BUSY) and a pool of
//! readers. Writes begin with `BEGIN IMMEDIATE` so a transaction that reads
//! before it writes never fails to upgrade its lock.

mod export;

use sqlx::ConnectOptions;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, SubsecRound, Utc};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection as _, FromRow, QueryBuilder, Sqlite, SqlitePool};

use super::API_KEY_COLUMNS;
use super::settled::{COUNT_A_REPAIR_SQL, COUNT_REPAIRS_SQL, Settled, SettledSums, bounds};
use super::{
    Backend, BeforeCommit, CommittedMark, ConsumeDecider, ConsumeResult, CsvSink, ExportFilter, JobLock, NewApiKey,
    OpenError, Store, StoreError, StreamError, TotalMismatch, TotalName, TotalRow, diff_totals, natural_key, replay,
    resolve_outcomes, total_past_64_bits, totals_sql,
};
use crate::domain::catalog::{Enforcement, Window};
use crate::domain::period::{Granularity, start_of};
use crate::domain::plan::{DefaultPlanChange, Override, OverrideChange, Period, PlanAssignment, from_the_start};
use crate::domain::{
    AccountId, Amount, ApiKey, Catalog, Entry, EntryFilter, IdempotencyKey, InsertOutcome, NewEntry, ResourceName, Role,
};

/// The SQLite implementation of [`Store`].
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    /// The rollup's own connection: it stages a batch in TEMP tables, which
    /// belong to one connection, before it takes the write lock (see
    /// [`Store::rollup_batch`] below); two rollups of this process take turns on it.
    rollup: SqlitePool,
    catalog: Arc<Catalog>,
    /// Settled sums behind `used` (see [`super::settled`]).
    settled: SettledSums,
    export_source: Arc<export::Source>,
    /// The database file whose lock file guards migrating: None in memory,
    /// and None when opening already waited [`LOCK_WAIT`] for that lock in
    /// vain (the command then goes on without it, and does not wait twice).
    migration_lock: Option<PathBuf>,
}

/// The options for the database `url` names, and where exports read it.
/// Every in-memory spelling (`sqlite::memory:`, `sqlite:file::memory:`,
/// `sqlite:?mode=memory`, `sqlite:file:x?mode=memory`) gets a shared-cache
/// name of this store's own, so that every connection of its pools and the
/// exports' own connection open one database. sqlx names only `:memory:` so;
/// the other spellings gave each connection a new, empty database, and the
/// schema migrated on one was missing on the next ("no such table").
fn database_of(url: &str) -> Result<(SqliteConnectOptions, export::Source), sqlx::Error> {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let options = SqliteConnectOptions::from_str(url)?;
    if !super::sqlite_in_memory(url) {
        let source = export::Source::File(super::sqlite_path(options.get_filename()));
        return Ok((options, source));
    }
    let name = format!("file:tally-in-memory-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let source = export::Source::Memory(format!("{name}?mode=memory&cache=shared"));
    Ok((options.filename(name).in_memory(true).shared_cache(true), source))
}

/// Refuses a URL that SQLite opened as an in-memory database though it did
/// not look like one to [`super::sqlite_in_memory`] (`?vfs=memdb`, a
/// percent-encoded `mode=memory`): each connection of the pools would get a
/// database of its own, and every command failed with "no such table" after
/// migrating another (review BN). SQLite names no file for such a database.
async fn refuse_an_unrecognised_in_memory_database(writer: &SqlitePool, url: &str) -> Result<(), sqlx::Error> {
    let main_file: String = sqlx::query_scalar("SELECT file FROM pragma_database_list WHERE name = 'main'")
        .fetch_one(writer)
        .await?;
    if main_file.is_empty() {
        return Err(sqlx::Error::Configuration(
            format!(
                "{} opens an in-memory database, written in a way Tally does not take for one: write it \
                 sqlite::memory: (for `serve`; every other command needs a file, since the database dies \
                 with the process)",
                super::redact_url(url)
            )
            .into(),
        ));
    }
    Ok(())
}

/// `options` with a hook that closes, rather than hands out, a connection
/// sqlx still counts inside a transaction. A `COMMIT` that fails on a full
/// disk is rolled back by SQLite itself, but sqlx keeps counting the
/// transaction, and its rollback at the drop then fails in turn: every
/// later `BEGIN IMMEDIATE` on that connection failed ("attempted to call
/// begin_with at non-zero transaction depth", 500) until a restart, and a
/// plain statement ran in no transaction sqlx knew of (review BO). The pool
/// pings a connection before handing it out, so the rollback a dropped
/// transaction queued has run by the time the hook looks.
fn without_leaked_transactions(options: SqlitePoolOptions) -> SqlitePoolOptions {
    use sqlx::TransactionManager as _;
    options.before_acquire(|connection, _| {
        Box::pin(async move {
            let depth = <sqlx::Sqlite as sqlx::Database>::TransactionManager::get_transaction_depth(connection);
            if depth > 0 {
                tracing::warn!(
                    depth,
                    "a database connection is still counted inside a transaction ({depth} deep) after its \
                     transaction ended (a commit that failed, such as on a full disk): closing it and opening \
                     another"
                );
            }
            Ok(depth == 0)
        })
    })
}

/// How long a process waits for another to finish opening or migrating the
/// database before it goes on without the lock, as SQLite's own busy timeout.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// An exclusive lock, held until dropped, for the steps two processes must
/// not take at once on one database file: opening a new file (switching it
/// to WAL needs it alone, and SQLite answers "database is locked" then rather
/// than wait) and migrating (sqlx takes no lock on SQLite: processes starting
/// at once on a new file each applied the migrations, and all but one failed
/// with "table entries already exists").
///
/// The lock is on a file of its own beside the database, named after its
/// real path (symlinks resolved) plus `.tally-lock`, never on the database
/// file: closing any descriptor of that file would drop the locks SQLite
/// holds on it in this process. Opened for reading when it exists (a lock
/// needs no more). `None` when another process held it for [`LOCK_WAIT`]
/// (stopped mid-migration, say): the caller goes on without it, as before
/// there was one, rather than hang.
async fn lock_beside_database(file: &std::path::Path) -> std::io::Result<Option<std::fs::File>> {
    let file = file.to_owned();
    tokio::task::spawn_blocking(move || {
        let lock_path = lock_path_of(&file)?;
        let in_context = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", lock_path.display()));
        let handle = match std::fs::File::open(&lock_path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&lock_path),
            opened => opened,
        }
        .map_err(in_context)?;
        let started = std::time::Instant::now();
        let mut waited_quietly = true;
        loop {
            match handle.try_lock() {
                Ok(()) => return Ok(Some(handle)),
                Err(std::fs::TryLockError::Error(e)) => return Err(in_context(e)),
                Err(std::fs::TryLockError::WouldBlock) if started.elapsed() >= LOCK_WAIT => {
                    tracing::warn!(
                        lock = %lock_path.display(),
                        "another process has held {} for {} s while opening or migrating the database; going on without it",
                        lock_path.display(),
                        LOCK_WAIT.as_secs()
                    );
                    return Ok(None);
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    if waited_quietly {
                        waited_quietly = false;
                        tracing::info!(
                            lock = %lock_path.display(),
                            "waiting for another process opening or migrating the database ({})",
                            lock_path.display()
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

/// The lock file of database `file`: beside its real path, so that a
/// symlink and its target, or two spellings of one path, share one lock.
fn lock_path_of(file: &std::path::Path) -> std::io::Result<PathBuf> {
    // A symlink to a file not created yet: where SQLite will create it.
    let mut file = file.to_owned();
    for _ in 0..40 {
        let Ok(target) = std::fs::read_link(&file) else { break };
        file = match file.parent() {
            Some(folder) => folder.join(target),
            None => target,
        };
    }
    let file = file.as_path();
    let real = match std::fs::canonicalize(file) {
        Ok(real) => real,
        // Not created yet: its folder's real path and its name.
        Err(_) => {
            let folder = match file.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => std::path::Path::new("."),
            };
            let name = file
                .file_name()
                .ok_or_else(|| std::io::Error::other(format!("{} names no file", file.display())))?;
            std::fs::canonicalize(folder)?.join(name)
        }
    };
    let mut lock = real.into_os_string();
    lock.push(".tally-lock");
    Ok(PathBuf::from(lock))
}

impl SqliteStore {
    /// Opens (creating if missing) the database file a `sqlite://` URL names.
    pub async fn connect(url: &str, catalog: Arc<Catalog>) -> Result<Self, sqlx::Error> {
        let (options, export_source) = database_of(url)?;
        let file = match &export_source {
            export::Source::File(file) => Some(file.clone()),
            export::Source::Memory(_) => None,
        };
        // A lock that cannot be taken (a missing folder) leaves the error to
        // SQLite's own open below, in its words.
        let opening = match &file {
            Some(file) => lock_beside_database(file).await,
            None => Ok(None),
        };
        let migration_lock = match opening {
            Ok(None) => None,
            _ => file.clone(),
        };
        let opening = opening.ok().flatten();
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: a ledger must not lose a committed entry on power loss.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            .log_slow_statements(super::SLOW_STATEMENT_LEVEL, Duration::from_secs(1));
        // The writer's page cache holds the hot index pages: a batch of
        // entries spread over many accounts lands on as many leaf pages of
        // `entries_idempotency` and `entries_account_id` (64 MiB, against
        // SQLite's default 2 MiB). Auto-checkpoints every 10 000 WAL pages
        // (≈ 40 MiB, default 1 000): a checkpoint copies each page once however
        // many commits rewrote it, and an ingest commit can dirty ~2 000 pages.
        // Durability is unchanged: with synchronous=FULL every commit syncs the WAL.
        let writer_options = options
            .clone()
            .pragma("cache_size", "-65536")
            .pragma("wal_autocheckpoint", "10000");
        let mut writer_pool = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30));
        if file.is_some() {
            writer_pool = without_leaked_transactions(writer_pool);
        } else {
            // An in-memory database lives while one of its connections
            // does: the pool's idle timeout (10 min) and connection lifetime
            // (30 min) closed them all on a quiet server and dropped it.
            // The writer's one connection is kept for the life of the store,
            // and is not given the hook: closing it could drop the database
            // (review BP).
            writer_pool = writer_pool.min_connections(1).idle_timeout(None).max_lifetime(None);
        }
        let writer = writer_pool.connect_with(writer_options.clone()).await?;
        if let Some(file) = &file
            && let Err(refused) = refuse_an_unrecognised_in_memory_database(&writer, url).await
        {
            // SQLite wrote no file: leave no lock file for one either.
            if !file.exists()
                && let Ok(lock) = lock_path_of(file)
            {
                let _ = std::fs::remove_file(lock);
            }
            return Err(refused);
        }
        // A second rollup of this process waits for the batch in flight,
        // which may be a large one while catching up.
        let rollup = without_leaked_transactions(SqlitePoolOptions::new())
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(600))
            .connect_with(writer_options)
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await?;
        drop(opening);
        Ok(Self {
            writer,
            reader,
            rollup,
            catalog,
            settled: SettledSums::default(),
            migration_lock,
            export_source: Arc::new(export_source),
        })
    }

    /// The pool for reads (for benchmarks and tests that inspect the database).
    pub fn pool(&self) -> &SqlitePool {
        &self.reader
    }

    /// An override row with its account.
    fn override_from_row(&self, row: OverrideRow) -> Result<(String, Override), StoreError> {
        let decimals = self.catalog.decimals(&row.resource);
        let (account, resource) = (&row.account, &row.resource);
        let expires_at = row
            .expires_at
            .map(|us| {
                from_micros(
                    us,
                    format_args!("expires_at of the override of {account} on {resource}"),
                )
            })
            .transpose()?;
        let updated_at = from_micros(
            row.updated_at,
            format_args!("updated_at of the override of {account} on {resource}"),
        )?;
        let value = Override {
            limit: row.limit_amount.map(|minor| Amount::from_minor(minor, decimals)),
            resource: ResourceName::from_stored(row.resource),
            enforcement: row.enforcement.as_deref().and_then(Enforcement::parse),
            window: row.limit_window.as_deref().and_then(Window::parse),
            expires_at,
            updated_at,
        };
        Ok((row.account, value))
    }

    /// Every change to an account's overrides, in the order made, read on `conn`.
    async fn override_changes_on(
        &self,
        conn: &mut sqlx::SqliteConnection,
        account: &AccountId,
    ) -> Result<Vec<OverrideChange>, StoreError> {
        let rows: Vec<OverrideHistoryRow> = sqlx::query_as(
            "SELECT account, resource, limit_amount, enforcement, limit_window, expires_at,
                    changed_at AS updated_at, removed
             FROM account_override_history WHERE account = ? ORDER BY changed_at, id",
        )
        .bind(account.as_str())
        .fetch_all(&mut *conn)
        .await?;
        rows.into_iter().map(|row| Ok(self.change_from_row(row)?.1)).collect()
    }

    /// A history row: the change with its account.
    fn change_from_row(&self, history: OverrideHistoryRow) -> Result<(String, OverrideChange), StoreError> {
        let (account, value) = self.override_from_row(history.row)?;
        Ok((
            account,
            OverrideChange {
                value,
                removed: history.removed,
            },
        ))
    }

    fn entry_from_row(&self, row: EntryRow) -> Result<Entry, StoreError> {
        let decimals = self.catalog.decimals(&row.resource);
        let id = row.id;
        let metadata = row
            .metadata
            .map(|m| serde_json::from_str(&m))
            .transpose()
            .map_err(|e| StoreError::Unexpected(format!("the metadata of entry {id} is not JSON: {e}")))?;
        Ok(Entry {
            id,
            account: AccountId::from_stored(row.account),
            resource: ResourceName::from_stored(row.resource),
            amount: Amount::from_minor(row.amount, decimals),
            occurred_at: from_micros(row.occurred_at, format_args!("occurred_at of entry {id}"))?,
            recorded_at: from_micros(row.recorded_at, format_args!("recorded_at of entry {id}"))?,
            idempotency_key: IdempotencyKey::from_stored(row.idempotency_key),
            source: row.source,
            metadata,
            reverses: row.reverses,
        })
    }

    /// The settled sums, after this process's look at the count of `tally
    /// verify --repair` runs when one is due, read through `executor` (see
    /// [`SettledSums::noticing_repairs`]).
    async fn settled_sums<'c>(&self, executor: impl sqlx::SqliteExecutor<'c>) -> Result<&SettledSums, StoreError> {
        let count_repairs = || sqlx::query_scalar(COUNT_REPAIRS_SQL).fetch_one(executor);
        self.settled.noticing_repairs(count_repairs).await
    }
}

/// The table, bucket column and bucket-of-an-entry expression of a granularity:
/// the one definition of an entry's UTC day and month in SQLite's SQL. The
/// expressions floor `occurred_at` (µs) to seconds: SQLite's `/` rounds
/// toward zero, which would put an instant before 1970 in the next day.
fn shape(granularity: Granularity) -> (&'static str, &'static str, &'static str) {
    match granularity {
        Granularity::Day => (
            "daily_totals",
            "day",
            "date((occurred_at - (occurred_at % 1000000 + 1000000) % 1000000) / 1000000, 'unixepoch')",
        ),
        Granularity::Month => (
            "monthly_totals",
            "month",
            "strftime('%Y-%m-01', (occurred_at - (occurred_at % 1000000 + 1000000) % 1000000) / 1000000, 'unixepoch')",
        ),
    }
}

/// A statement of `sql/sqlite/` with `{table}`, `{bucket}` and
/// `{bucket_of_entry}` filled in for `granularity` ([`shape`]).
fn bucketed_sql(template: &str, granularity: Granularity) -> String {
    let (table, bucket, bucket_of_entry) = shape(granularity);
    totals_sql(template, table, bucket, bucket_of_entry)
}

/// µs since the epoch, the stored form of a timestamp.
pub(crate) fn to_micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// The inverse of [`to_micros`]. `what` names the stored value for the error
/// when it is past chrono's range (only a row written by hand can be).
pub(crate) fn from_micros(us: i64, what: fmt::Arguments<'_>) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_micros(us).ok_or_else(|| {
        StoreError::Unexpected(format!(
            "{what} is {us} µs since 1970, which is not an instant Tally can represent"
        ))
    })
}

#[derive(FromRow)]
struct EntryRow {
    id: i64,
    account: String,
    resource: String,
    amount: i64,
    occurred_at: i64,
    recorded_at: i64,
    idempotency_key: String,
    source: Option<String>,
    metadata: Option<String>,
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
    created_at: i64,
    revoked_at: Option<i64>,
}

impl TryFrom<ApiKeyRow> for ApiKey {
    type Error = StoreError;

    fn try_from(row: ApiKeyRow) -> Result<Self, StoreError> {
        let id = row.id;
        Ok(ApiKey {
            id,
            name: row.name,
            role: Role::parse(&row.role).map_err(|e| StoreError::Unexpected(format!("API key {id}: {e}")))?,
            account: row.account.map(AccountId::from_stored),
            prefix: row.prefix,
            created_at: from_micros(row.created_at, format_args!("created_at of API key {id}"))?,
            revoked_at: row
                .revoked_at
                .map(|us| from_micros(us, format_args!("revoked_at of API key {id}")))
                .transpose()?,
        })
    }
}

/// Stores a key; with `only_if_none`, only when the table holds no key at all.
async fn insert_api_key(
    executor: impl sqlx::SqliteExecutor<'_>,
    new: &NewApiKey,
    only_if_none: bool,
) -> Result<Option<ApiKeyRow>, StoreError> {
    Ok(sqlx::query_as(&format!(
        "INSERT INTO api_keys (name, role, account, key_hash, prefix, created_at)
         SELECT ?1, ?2, ?3, ?4, ?5, ?6 WHERE NOT ?7 OR NOT EXISTS (SELECT 1 FROM api_keys)
         RETURNING {API_KEY_COLUMNS}"
    ))
    .bind(new.name.as_deref())
    .bind(new.role.as_str())
    .bind(new.account.as_ref().map(AccountId::as_str))
    .bind(&new.hash)
    .bind(&new.prefix)
    .bind(to_micros(Utc::now()))
    .bind(only_if_none)
    .fetch_optional(executor)
    .await?)
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn migrate(&self) -> Result<(), OpenError> {
        let migrator = sqlx::migrate!("migrations/sqlite");
        // One process migrates at a time (see lock_beside_database).
        let _migrating = match &self.migration_lock {
            Some(file) => lock_beside_database(file).await.unwrap_or_else(|e| {
                tracing::warn!(
                    error = %e,
                    "cannot take the migration lock ({e}); running the migrations unguarded (start one process at a time on a new file)"
                );
                None
            }),
            None => None,
        };
        let mut conn = self.writer.acquire().await?;
        let table_exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations')",
        )
        .fetch_one(&mut *conn)
        .await?;
        super::run_migrations(&migrator, &mut *conn, table_exists).await
    }

    async fn close(&self) {
        let wait = super::CLOSE_WAIT;
        // Readers first: a checkpoint stops at the oldest snapshot a reader holds.
        for pool in [&self.reader, &self.rollup] {
            if tokio::time::timeout(wait, pool.close()).await.is_err() {
                tracing::warn!("connections still in use after {} s; leaving them", wait.as_secs());
            }
        }
        // PASSIVE: every commit no reader still needs the old pages of is
        // copied into the file, without waiting for anyone (TRUNCATE waited
        // the busy timeout for any other process's read transaction, a
        // `.backup` or a long export, so every command took 10 s more).
        // Closing the last connection then removes the WAL.
        let checkpoint = sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&self.writer);
        match tokio::time::timeout(wait, checkpoint).await {
            // (busy, frames in the log, frames copied): all copied.
            Ok(Ok((_, log, copied))) if log == copied => {}
            Ok(Ok(_)) => tracing::warn!(
                "the write-ahead log could not be checkpointed: another process reads the database; its \
                 commits stay in the -wal file until a later checkpoint (copy all three files, or take a \
                 copy with `sqlite3 tally.db \"VACUUM INTO 'copy.db'\"`)"
            ),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot checkpoint the write-ahead log: {e}"),
            Err(_) => tracing::warn!(
                "the write-ahead log checkpoint did not finish within {} s",
                wait.as_secs()
            ),
        }
        if tokio::time::timeout(wait, self.writer.close()).await.is_err() {
            tracing::warn!(
                "the writer connection is still in use after {} s; leaving it",
                wait.as_secs()
            );
        }
    }

    async fn insert_entries(&self, entries: &[NewEntry]) -> Result<Vec<InsertOutcome>, StoreError> {
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        // Stamped once the write lock is held, not before the wait for it
        // (up to 40 s): between stamp and commit lies only the write itself,
        // the window in which an `--as-of` export of an instant just past can
        // still gain rows (docs/reports.md).
        let recorded_at = to_micros(Utc::now());
        // Multi-row INSERTs in fixed-size chunks (see `chunk_len`): one
        // statement per chunk instead of one per row. Rows go in request
        // order, so AUTOINCREMENT ids follow request order, and a key repeated
        // later in the batch hits ON CONFLICT DO NOTHING like any existing key.
        let mut created = HashMap::with_capacity(entries.len());
        let mut rest = entries;
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(chunk_len(rest.len()));
            let rows = insert_chunk(&mut tx, chunk, recorded_at)
                .await
                .map_err(|e| super::map_reversal_violation(e, entries))?;
            for (id, account, key) in rows {
                created.insert((account, key), id);
            }
            rest = tail;
        }
        let mut existing = HashMap::new();
        if created.len() < entries.len() {
            // The keys the inserts skipped: read what is stored under them (each once).
            let mut seen = std::collections::HashSet::new();
            let missing: Vec<&NewEntry> = entries
                .iter()
                .filter(|e| {
                    let key = natural_key(&e.account, &e.idempotency_key);
                    !created.contains_key(&key) && seen.insert(key)
                })
                .collect();
            let mut rest = &missing[..];
            while !rest.is_empty() {
                let (chunk, tail) = rest.split_at(chunk_len(rest.len()));
                for row in select_chunk(&mut tx, chunk).await? {
                    let entry = self.entry_from_row(row)?;
                    existing.insert(natural_key(&entry.account, &entry.idempotency_key), entry);
                }
                rest = tail;
            }
        }
        // Decide before committing: a conflict anywhere rolls the whole batch back.
        let outcomes = resolve_outcomes(entries, &created, &existing)?;
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn holds_keys(&self, keys: &[(&AccountId, &IdempotencyKey)]) -> Result<Vec<bool>, StoreError> {
        // The pairs travel as one JSON array: one statement for any number.
        let pairs: Vec<[&str; 2]> = keys.iter().map(|(a, k)| [a.as_str(), k.as_str()]).collect();
        let held: Vec<i64> = sqlx::query_scalar(
            "SELECT CAST(pair.key AS INTEGER) FROM json_each(?1) AS pair
             WHERE EXISTS (SELECT 1 FROM entries
                           WHERE account = pair.value ->> 0 AND idempotency_key = pair.value ->> 1)",
        )
        .bind(serde_json::to_string(&pairs).expect("strings serialise"))
        .fetch_all(&self.reader)
        .await?;
        Ok(super::flags_at(keys.len(), held))
    }

    async fn entry(&self, id: i64) -> Result<Entry, StoreError> {
        let row: Option<EntryRow> = sqlx::query_as(&format!("SELECT {ENTRY_COLUMNS} FROM entries WHERE id = ?"))
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        self.entry_from_row(row.ok_or_else(|| StoreError::entry_not_found(id))?)
    }

    async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<Entry>, StoreError> {
        let mut query = QueryBuilder::<Sqlite>::new(format!("SELECT {ENTRY_COLUMNS} FROM entries WHERE id > "));
        query.push_bind(filter.after_id.unwrap_or(0));
        if let Some(account) = &filter.account {
            query.push(" AND account = ").push_bind(account.as_str());
        }
        if let Some(resource) = &filter.resource {
            query.push(" AND resource = ").push_bind(resource.as_str());
        }
        if let Some(from) = filter.from {
            query.push(" AND occurred_at >= ").push_bind(to_micros(from));
        }
        if let Some(to) = filter.to {
            query.push(" AND occurred_at < ").push_bind(to_micros(to));
        }
        query.push(" ORDER BY id LIMIT ").push_bind(i64::from(filter.limit));
        let rows: Vec<EntryRow> = query.build_query_as().fetch_all(&self.reader).await?;
        rows.into_iter().map(|r| self.entry_from_row(r)).collect()
    }

    async fn create_api_key(&self, new: &NewApiKey) -> Result<ApiKey, StoreError> {
        let row = insert_api_key(&self.writer, new, false).await?;
        row.ok_or_else(|| StoreError::Unexpected("a key insert stored nothing".into()))?
            .try_into()
    }

    async fn api_key_by_hash(&self, hash: &str) -> Result<Option<ApiKey>, StoreError> {
        let row: Option<ApiKeyRow> = sqlx::query_as(&format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE key_hash = ? AND revoked_at IS NULL"
        ))
        .bind(hash)
        .fetch_optional(&self.reader)
        .await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn list_api_keys(&self) -> Result<Vec<ApiKey>, StoreError> {
        let rows: Vec<ApiKeyRow> = sqlx::query_as(&format!("SELECT {API_KEY_COLUMNS} FROM api_keys ORDER BY id"))
            .fetch_all(&self.reader)
            .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    async fn revoke_api_key(&self, id: i64) -> Result<ApiKey, StoreError> {
        let row: Option<ApiKeyRow> = sqlx::query_as(&format!(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ? RETURNING {API_KEY_COLUMNS}"
        ))
        .bind(to_micros(Utc::now()))
        .bind(id)
        .fetch_optional(&self.writer)
        .await?;
        row.ok_or_else(|| {
            StoreError::NotFound(format!("API key {id} does not exist; `tally keys list` shows the keys"))
        })?
        .try_into()
    }

    async fn create_first_api_key(&self, new: &NewApiKey) -> Result<Option<ApiKey>, StoreError> {
        // BEGIN IMMEDIATE: the write lock before the read, so no other
        // process inserts a key between them.
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let row = insert_api_key(&mut *tx, new, true).await?;
        tx.commit().await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn rollup_batch(&self, max_entries: u32, before_commit: &BeforeCommit) -> Result<u64, StoreError> {
        // Reading and summing the batch is most of the work, and it needs no
        // write lock: it runs on the rollup's connection into TEMP tables
        // while posts go on. The write lock is then held only to add the
        // staged sums to the totals and move the cursor.
        let mut conn = self.rollup.acquire().await?;
        loop {
            let staged = match stage_batch(&mut conn, max_entries).await {
                Ok(Some(staged)) => staged,
                Ok(None) => return Ok(0),
                Err(e) if passed_64_bits(&e) => {
                    return fold_with_parts(&mut conn, &self.writer, u64::from(max_entries), before_commit).await;
                }
                Err(e) => return Err(e),
            };
            let written = write_staged_batch(&mut conn, &self.writer, &staged, before_commit).await;
            sqlx::query(include_str!("sql/sqlite/rollup_stage_reset.sql"))
                .execute(&mut *conn)
                .await?;
            match written {
                Ok(true) => return Ok(staged.entries),
                // Another process's rollup moved the cursor since this batch
                // was staged: its rows may be folded already. Stage afresh.
                Ok(false) => {}
                Err(e) if passed_64_bits(&e) => {
                    return fold_with_parts(&mut conn, &self.writer, staged.entries, before_commit).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn unfolded_estimate(&self) -> Result<u64, StoreError> {
        let backlog: i64 = sqlx::query_scalar(super::UNFOLDED_ESTIMATE_SQL)
            .fetch_one(&self.reader)
            .await?;
        Ok(u64::try_from(backlog).unwrap_or(0))
    }

    fn rollup_batch_cap(&self) -> u32 {
        // A batch holds SQLite's one write lock, with posts waiting behind
        // it, only while it adds its staged sums to the totals. That costs
        // about one pass over the totals the batch touches, whatever its
        // rows: on a large ledger a smaller cap does not shorten the longest
        // hold, it only adds holds (docs/performance.md).
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
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM entries WHERE account = ?1 AND resource = ?2)")
                    .bind(account.as_str())
                    .bind(resource.as_str())
                    .fetch_one(&self.reader)
                    .await?
            }
            None => {
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM entries WHERE resource = ?1)")
                    .bind(resource.as_str())
                    .fetch_one(&self.reader)
                    .await?
            }
        };
        Ok(found)
    }

    async fn oldest_unfolded(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let oldest: Option<i64> = sqlx::query_scalar(
            "SELECT recorded_at FROM entries
             WHERE id > (SELECT last_id FROM rollup_cursor WHERE name = 'rollup')
             ORDER BY id LIMIT 1",
        )
        .fetch_optional(&self.reader)
        .await?;
        oldest
            .map(|us| from_micros(us, format_args!("recorded_at of the oldest unfolded entry")))
            .transpose()
    }

    async fn committed_so_far(&self) -> Result<CommittedMark, StoreError> {
        let newest: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM entries")
            .fetch_one(&self.reader)
            .await?;
        Ok(CommittedMark::LastId(newest))
    }

    async fn oldest_unfolded_by(&self, mark: &CommittedMark) -> Result<Option<DateTime<Utc>>, StoreError> {
        let &CommittedMark::LastId(newest) = mark else {
            return Err(StoreError::Unexpected(format!("a SQLite ledger was given {mark:?}")));
        };
        let oldest: Option<i64> = sqlx::query_scalar(
            "SELECT recorded_at FROM entries
             WHERE id > (SELECT last_id FROM rollup_cursor WHERE name = 'rollup') AND id <= ?1
             ORDER BY id LIMIT 1",
        )
        .bind(newest)
        .fetch_optional(&self.reader)
        .await?;
        oldest
            .map(|us| from_micros(us, format_args!("recorded_at of the oldest unfolded entry")))
            .transpose()
    }

    async fn bucket_totals(
        &self,
        account: &AccountId,
        resource: &ResourceName,
        granularity: Granularity,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<(NaiveDate, i64)>, StoreError> {
        static SQL: LazyLock<[String; 2]> = LazyLock::new(|| {
            [
                bucketed_sql(include_str!("sql/sqlite/bucket_totals_day.sql"), Granularity::Day),
                bucketed_sql(include_str!("sql/sqlite/bucket_totals_month.sql"), Granularity::Month),
            ]
        });
        let sql = &SQL[usize::from(granularity == Granularity::Month)];
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(sql)
            .bind(account.as_str())
            .bind(resource.as_str())
            .bind(from.to_string())
            .bind(to.to_string())
            .bind(to_micros(start_of(from)))
            .bind(to_micros(start_of(to)))
            .fetch_all(&self.reader)
            .await?;
        // A bucket's parts and its tail, added in 128 bits (see `joined`).
        let mut buckets: BTreeMap<NaiveDate, i128> = BTreeMap::new();
        for (bucket, high, low) in rows {
            *buckets.entry(parse_date(&bucket)?).or_default() += joined(high, low);
        }
        buckets
            .into_iter()
            .map(|(bucket, amount)| {
                i64::try_from(amount)
                    .map(|amount| (bucket, amount))
                    .map_err(|_| total_past_64_bits(account.as_str(), resource.as_str(), bucket))
            })
            .collect()
    }

    async fn verify_totals(&self) -> Result<Vec<TotalMismatch>, StoreError> {
        // One read transaction: WAL gives it one snapshot for all four reads.
        let mut tx = self.reader.begin().await?;
        let mismatches = totals_against_ledger(&mut tx).await?;
        tx.rollback().await?;
        Ok(mismatches)
    }

    async fn repair_totals(&self) -> Result<Vec<TotalMismatch>, StoreError> {
        // BEGIN IMMEDIATE: SQLite's one write lock before the reads, so no
        // rollup (of any process) folds between them and the rewrite.
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let mismatches = totals_against_ledger(&mut tx).await?;
        for mismatch in &mismatches {
            let granularity = mismatch.granularity();
            let (table, column, _) = shape(granularity);
            let bucket = mismatch.bucket.to_string();
            sqlx::query(&format!(
                "DELETE FROM {table} WHERE account = ?1 AND resource = ?2 AND {column} = ?3"
            ))
            .bind(&mismatch.account)
            .bind(&mismatch.resource)
            .bind(&bucket)
            .execute(&mut *tx)
            .await?;
            if let Some((amount, entries)) = mismatch.expected {
                // As parts: the ledger's figure may pass 64 bits (migration 0011).
                add_to_parts(
                    &mut tx,
                    granularity,
                    &mismatch.account,
                    &mismatch.resource,
                    &bucket,
                    amount,
                    entries,
                )
                .await?;
            }
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
        // Only a total held in parts can be past 64 bits (migration 0011);
        // such totals are few, so their parts are added here, in 128 bits.
        let mut tx = self.reader.begin().await?;
        let mut past = Vec::new();
        for granularity in [Granularity::Day, Granularity::Month] {
            let (table, column, _) = shape(granularity);
            let parts: Vec<(String, String, String, i64)> = sqlx::query_as(&format!(
                "SELECT account, resource, {column}, amount FROM {table}
                  WHERE (account, resource, {column}) IN
                        (SELECT account, resource, {column} FROM {table}
                          GROUP BY account, resource, {column} HAVING COUNT(*) > 1)
                  ORDER BY account, resource, {column}"
            ))
            .fetch_all(&mut *tx)
            .await?;
            let mut totals: Vec<((String, String, String), i128)> = Vec::new();
            for (account, resource, bucket, amount) in parts {
                let key = (account, resource, bucket);
                match totals.last_mut() {
                    Some((last, sum)) if *last == key => *sum += i128::from(amount),
                    _ => totals.push((key, i128::from(amount))),
                }
            }
            for ((account, resource, bucket), sum) in totals {
                if i64::try_from(sum).is_err() {
                    past.push(TotalName {
                        granularity,
                        account,
                        resource,
                        bucket: parse_date(&bucket)?,
                    });
                }
            }
        }
        tx.rollback().await?;
        Ok(past)
    }

    async fn try_job_lock(&self, _job: &str) -> Result<Option<JobLock>, StoreError> {
        Ok(Some(JobLock::in_process()))
    }

    async fn assign_plan(
        &self,
        account: &AccountId,
        plan: &str,
        effective_at: DateTime<Utc>,
    ) -> Result<PlanAssignment, StoreError> {
        // To the microsecond, as stored.
        let now = Utc::now().trunc_subsecs(6);
        sqlx::query("INSERT INTO account_plans (account, plan, effective_at, created_at) VALUES (?, ?, ?, ?)")
            .bind(account.as_str())
            .bind(plan)
            .bind(to_micros(effective_at))
            .bind(to_micros(now))
            .execute(&self.writer)
            .await?;
        Ok(PlanAssignment {
            plan: plan.to_owned(),
            effective_at,
            created_at: now,
        })
    }

    async fn recorded_default_plan(&self) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(super::LAST_DEFAULT_PLAN)
            .fetch_optional(&self.reader)
            .await?)
    }

    async fn recorded_digits(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(sqlx::query_as("SELECT resource, digits FROM resource_digits")
            .fetch_all(&self.reader)
            .await?)
    }

    async fn holds_amounts_of(&self, resource: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM entries WHERE resource = ?1)
                 OR EXISTS (SELECT 1 FROM account_override_history WHERE resource = ?1)",
        )
        .bind(resource)
        .fetch_one(&self.reader)
        .await?)
    }

    async fn record_digits(&self, digits: &[(String, u32)], replace: bool) -> Result<(), StoreError> {
        let on_conflict = super::digits_on_conflict(replace);
        let now = to_micros(Utc::now());
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        for (resource, digits) in digits {
            sqlx::query(&format!(
                "INSERT INTO resource_digits (resource, digits, recorded_at) VALUES (?1, ?2, ?3) {on_conflict}"
            ))
            .bind(resource)
            .bind(i64::from(*digits))
            .bind(now)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn record_default_plan(&self, catalog: &Catalog) -> Result<Option<DefaultPlanChange>, StoreError> {
        let default = catalog.default_plan.as_str();
        // Looked at first without a lock: on every open but the one after a
        // change this is all, and it needs no write access.
        if self.recorded_default_plan().await?.as_deref() == Some(default) {
            return Ok(None);
        }
        // BEGIN IMMEDIATE: the write lock before the second look, so two
        // processes opening with a new default record (and assign) once.
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        // To the microsecond, as stored: one instant for the change's rows.
        let now = to_micros(Utc::now().trunc_subsecs(6));
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
                let assigned = sqlx::query(include_str!("sql/sqlite/keep_the_previous_default_plan.sql"))
                    .bind(previous)
                    .bind(to_micros(from_the_start()))
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
        sqlx::query("INSERT INTO default_plans (plan, recorded_at) VALUES (?1, ?2)")
            .bind(default)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(change))
    }

    async fn plan_history(&self, account: &AccountId) -> Result<Vec<PlanAssignment>, StoreError> {
        let mut conn = self.reader.acquire().await?;
        Ok(plans_on(&mut conn, account).await?)
    }

    async fn plans_in_force(&self, at: DateTime<Utc>) -> Result<Vec<(String, i64)>, StoreError> {
        // The assignment in force at `at` is the one a consume would pick
        // (latest effective_at, then created_at, then id; see plan_at).
        let at = to_micros(at);
        let mut conn = self.reader.acquire().await?;
        Ok(sqlx::query_as(
            "SELECT ap.plan, COUNT(DISTINCT ap.account)
               FROM account_plans AS ap
              -- A later assignment, unless another made after it takes
              -- effect at the same instant (it wins the tie, so this one
              -- never takes effect); or the one in force now.
              WHERE (ap.effective_at > ?1
                     AND NOT EXISTS (SELECT 1 FROM account_plans AS y
                                      WHERE y.account = ap.account AND y.effective_at = ap.effective_at
                                        AND (y.created_at, y.id) > (ap.created_at, ap.id)))
                 OR ap.id = (SELECT x.id FROM account_plans AS x
                              WHERE x.account = ap.account AND x.effective_at <= ?1
                              ORDER BY x.effective_at DESC, x.created_at DESC, x.id DESC LIMIT 1)
              GROUP BY ap.plan
              ORDER BY ap.plan",
        )
        .bind(at)
        .fetch_all(&mut *conn)
        .await?)
    }

    async fn put_override(&self, account: &AccountId, value: &Override) -> Result<(), StoreError> {
        // The change and its history row in one transaction.
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(
            "INSERT INTO account_overrides (account, resource, limit_amount, enforcement, limit_window, expires_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (account, resource) DO UPDATE SET
                limit_amount = excluded.limit_amount, enforcement = excluded.enforcement,
                limit_window = excluded.limit_window, expires_at = excluded.expires_at, updated_at = excluded.updated_at;
             INSERT INTO account_override_history
                 (account, resource, limit_amount, enforcement, limit_window, expires_at, changed_at, removed)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0)",
        )
        .bind(account.as_str())
        .bind(value.resource.as_str())
        .bind(value.limit.map(Amount::minor))
        .bind(value.enforcement.map(Enforcement::as_str))
        .bind(value.window.map(Window::as_str))
        .bind(value.expires_at.map(to_micros))
        .bind(to_micros(value.updated_at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn delete_override(
        &self,
        account: &AccountId,
        resource: &ResourceName,
        removed_at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        // The removal and its history row in one transaction.
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        let done = sqlx::query("DELETE FROM account_overrides WHERE account = ? AND resource = ?")
            .bind(account.as_str())
            .bind(resource.as_str())
            .execute(&mut *tx)
            .await?;
        let removed = done.rows_affected() > 0;
        if removed {
            sqlx::query(
                "INSERT INTO account_override_history (account, resource, changed_at, removed) VALUES (?, ?, ?, 1)",
            )
            .bind(account.as_str())
            .bind(resource.as_str())
            .bind(to_micros(removed_at))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(removed)
    }

    async fn plans_and_override_changes(
        &self,
        account: &AccountId,
    ) -> Result<(Vec<PlanAssignment>, Vec<OverrideChange>), StoreError> {
        // One connection for both reads.
        let mut conn = self.reader.acquire().await?;
        let plans = plans_on(&mut conn, account).await?;
        Ok((plans, self.override_changes_on(&mut conn, account).await?))
    }

    async fn used(&self, account: &AccountId, resource: &ResourceName, period: &Period) -> Result<i64, StoreError> {
        let mut conn = self.reader.acquire().await?;
        let settled = self.settled_sums(&mut *conn).await?;
        used_on(&mut conn, settled, account, resource, period).await
    }

    async fn used_resources(&self, account: &AccountId) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT resource FROM monthly_totals WHERE account = ?1
             UNION
             SELECT resource FROM entries
             WHERE account = ?1 AND id > (SELECT last_id FROM rollup_cursor WHERE name = 'rollup')
             ORDER BY 1",
        )
        .bind(account.as_str())
        .fetch_all(&self.reader)
        .await?)
    }

    async fn consume(&self, entry: &NewEntry, decide: &dyn ConsumeDecider) -> Result<ConsumeResult, StoreError> {
        // BEGIN IMMEDIATE takes SQLite's one write lock before reading the
        // limits and `used`: no other writer can append, or change a plan or
        // an override, between the check and the insert.
        let mut tx = self.writer.begin_with("BEGIN IMMEDIATE").await?;
        // Under the write lock, so a repair this consume waited for counts.
        let settled = self.settled_sums(&mut *tx).await?;
        let stored: Option<(EntryRow, Option<String>)> = fetch_with_outcome(&mut tx, entry).await?;
        if let Some((row, response)) = stored {
            return replay(entry, &self.entry_from_row(row)?, response);
        }
        let plans = plans_on(&mut tx, &entry.account).await?;
        let overrides = self.override_changes_on(&mut tx, &entry.account).await?;
        let mut used = Vec::with_capacity(2);
        for period in decide.periods(&plans, &overrides) {
            used.push(used_on(&mut tx, settled, &entry.account, &entry.resource, &period).await?);
        }
        let response = match decide.decide(&plans, &overrides, &used) {
            Ok(response) => response,
            Err(reason) => return Ok(ConsumeResult::Rejected { reason }),
        };
        let entry_id = insert_row(&mut tx, entry, to_micros(Utc::now()))
            .await?
            .ok_or_else(|| StoreError::key_taken(None))?;
        sqlx::query("INSERT INTO consume_outcomes (entry_id, response) VALUES (?, ?)")
            .bind(entry_id)
            .bind(&response)
            .execute(&mut *tx)
            .await?;
        // Dropping the transaction rolls the rows back.
        if let Err(reason) = decide.charge_rate(&plans) {
            return Ok(ConsumeResult::Rejected { reason });
        }
        tx.commit().await?;
        Ok(ConsumeResult::Recorded { entry_id, response })
    }

    async fn export_entries(&self, filter: &ExportFilter, sink: &mut dyn CsvSink) -> Result<u64, StreamError> {
        export::entries(&self.export_source, &self.catalog, filter, sink).await
    }

    async fn export_totals(
        &self,
        granularity: Granularity,
        filter: &ExportFilter,
        sink: &mut dyn CsvSink,
    ) -> Result<u64, StreamError> {
        export::totals(&self.export_source, &self.catalog, granularity, filter, sink).await
    }

    fn stream_totals<'a>(
        &'a self,
        granularity: Granularity,
        filter: &'a ExportFilter,
    ) -> BoxStream<'a, Result<TotalRow, StoreError>> {
        static SQL: LazyLock<[String; 4]> = LazyLock::new(|| {
            let live = include_str!("sql/sqlite/export_totals.sql");
            let as_of = include_str!("sql/sqlite/export_totals_as_of.sql");
            [
                bucketed_sql(live, Granularity::Day),
                bucketed_sql(live, Granularity::Month),
                bucketed_sql(as_of, Granularity::Day),
                bucketed_sql(as_of, Granularity::Month),
            ]
        });
        let index = usize::from(granularity == Granularity::Month) + 2 * usize::from(filter.as_of.is_some());
        let rows = sqlx::query_as::<_, (String, String, String, i64, i64, i64)>(SQL[index].as_str())
            .bind(filter.from.to_string())
            .bind(filter.to.to_string())
            .bind(filter.account.as_ref().map(|a| a.as_str().to_owned()))
            .bind(filter.resource.as_ref().map(|r| r.as_str().to_owned()))
            .bind(to_micros(start_of(filter.from)))
            .bind(to_micros(start_of(filter.to)))
            .bind(filter.as_of.map(to_micros))
            .fetch(&self.reader);
        Box::pin(rows.map(|row| {
            let (account, resource, bucket, high, low, entries) = row?;
            let bucket = parse_date(&bucket)?;
            let amount =
                i64::try_from(joined(high, low)).map_err(|_| total_past_64_bits(&account, &resource, bucket))?;
            Ok(TotalRow {
                account,
                resource,
                bucket,
                amount,
                entries,
            })
        }))
    }

    async fn all_plan_assignments(&self) -> Result<Vec<(String, PlanAssignment)>, StoreError> {
        let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
            "SELECT account, plan, effective_at, created_at FROM account_plans ORDER BY account, effective_at, id",
        )
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter()
            .map(|(account, plan, effective_at, created_at)| {
                let assignment = plan_from_row(&account, plan, effective_at, created_at)?;
                Ok((account, assignment))
            })
            .collect()
    }

    async fn override_history(
        &self,
        as_of: Option<DateTime<Utc>>,
    ) -> Result<Vec<(String, OverrideChange)>, StoreError> {
        let rows: Vec<OverrideHistoryRow> = sqlx::query_as(include_str!("sql/sqlite/override_history.sql"))
            .bind(as_of.map(to_micros))
            .fetch_all(&self.reader)
            .await?;
        rows.into_iter().map(|history| self.change_from_row(history)).collect()
    }
}

/// A rollup batch summed into the rollup connection's TEMP tables, not yet
/// added to the totals.
struct StagedBatch {
    /// The cursor the batch starts after, as read when staging.
    after_id: i64,
    /// Its last ledger id.
    last_id: i64,
    /// Ledger rows in it.
    entries: u64,
}

/// Sums the next batch of at most `max_entries` rows past the cursor into the
/// TEMP tables of `conn`, without the write lock (None: nothing to fold).
///
/// One writer and AUTOINCREMENT make id order commit order, so once a read
/// sees id N committed, no row at or below N can still appear: the batch's
/// rows are final even though no lock holds them.
async fn stage_batch(conn: &mut sqlx::SqliteConnection, max_entries: u32) -> Result<Option<StagedBatch>, StoreError> {
    let after_id: i64 = sqlx::query_scalar("SELECT last_id FROM rollup_cursor WHERE name = 'rollup'")
        .fetch_one(&mut *conn)
        .await?;
    let (last_id, entries): (Option<i64>, i64) =
        sqlx::query_as("SELECT MAX(id), COUNT(*) FROM (SELECT id FROM entries WHERE id > ?1 ORDER BY id LIMIT ?2)")
            .bind(after_id)
            .bind(i64::from(max_entries))
            .fetch_one(&mut *conn)
            .await?;
    let Some(last_id) = last_id else {
        return Ok(None);
    };
    sqlx::query(include_str!("sql/sqlite/rollup_stage_reset.sql"))
        .execute(&mut *conn)
        .await?;
    static STAGE_DAYS: LazyLock<String> =
        LazyLock::new(|| bucketed_sql(include_str!("sql/sqlite/rollup_stage_days.sql"), Granularity::Day));
    sqlx::query(&STAGE_DAYS)
        .bind(after_id)
        .bind(last_id)
        .execute(&mut *conn)
        .await?;
    sqlx::query(include_str!("sql/sqlite/rollup_stage_months.sql"))
        .execute(&mut *conn)
        .await?;
    Ok(Some(StagedBatch {
        after_id,
        last_id,
        entries: u64::try_from(entries).unwrap_or(0),
    }))
}

/// Adds the batch staged on `conn` to the totals and moves the cursor, in one
/// transaction under SQLite's write lock. False, with nothing written, when
/// the cursor is no longer where the batch starts (another process's rollup
/// folded meanwhile).
async fn write_staged_batch(
    conn: &mut sqlx::SqliteConnection,
    writer: &SqlitePool,
    staged: &StagedBatch,
    before_commit: &BeforeCommit,
) -> Result<bool, StoreError> {
    // This process's writes queue for its one writer connection; holding it
    // keeps them queued there (not spinning on SQLITE_BUSY) while the rollup's
    // connection holds the write lock.
    let _writer_turn = writer.acquire().await?;
    let started = std::time::Instant::now();
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let cursor: i64 = sqlx::query_scalar("SELECT last_id FROM rollup_cursor WHERE name = 'rollup'")
        .fetch_one(&mut *tx)
        .await?;
    if cursor != staged.after_id {
        return Ok(false);
    }
    for sql in [
        include_str!("sql/sqlite/rollup_daily.sql"),
        include_str!("sql/sqlite/rollup_monthly.sql"),
    ] {
        sqlx::query(sql).execute(&mut *tx).await?;
    }
    sqlx::query("UPDATE rollup_cursor SET last_id = ?1, updated_at = ?2 WHERE name = 'rollup'")
        .bind(staged.last_id)
        .bind(to_micros(Utc::now()))
        .execute(&mut *tx)
        .await?;
    before_commit()?;
    tx.commit().await?;
    tracing::debug!(
        entries = staged.entries,
        write_lock_ms = started.elapsed().as_millis(),
        "rollup batch written"
    );
    Ok(true)
}

/// Whether a staged fold failed because a sum left 64 bits: in the staging
/// SUM (SQLite's "integer overflow"), or in adding to a total, where SQLite's
/// `+` turns the sum into REAL and the STRICT column refuses it
/// (SQLITE_CONSTRAINT_DATATYPE, 3091).
fn passed_64_bits(error: &StoreError) -> bool {
    match error {
        StoreError::Overflow { .. } => true,
        StoreError::Internal(sqlx::Error::Database(db)) => db.code().as_deref() == Some("3091"),
        _ => false,
    }
}

/// A sum SQLite read in two halves, `SUM(amount >> 32)` and
/// `SUM(amount & 4294967295)`, joined in 128 bits. A plain SUM raises as soon
/// as its running sum leaves 64 bits, even when the net fits (PostgreSQL adds
/// a `bigint` SUM in `numeric` and answers); the halves cannot overflow short
/// of 2^31 rows.
pub(crate) fn joined(high: i64, low: i64) -> i128 {
    (i128::from(high) << 32) + i128::from(low)
}

/// Every daily and monthly total against its folded ledger rows, read in the
/// caller's transaction (one snapshot).
async fn totals_against_ledger(conn: &mut sqlx::SqliteConnection) -> Result<Vec<TotalMismatch>, StoreError> {
    let mut mismatches = Vec::new();
    for (table, expected_sql, actual_sql) in [
        (
            "daily",
            bucketed_sql(include_str!("sql/sqlite/verify_daily.sql"), Granularity::Day),
            "SELECT account, resource, day, amount, entries FROM daily_totals",
        ),
        (
            "monthly",
            bucketed_sql(include_str!("sql/sqlite/verify_monthly.sql"), Granularity::Month),
            "SELECT account, resource, month, amount, entries FROM monthly_totals",
        ),
    ] {
        let expected: Vec<(String, String, String, i64, i64, i64)> =
            sqlx::query_as(&expected_sql).fetch_all(&mut *conn).await?;
        let expected = expected
            .into_iter()
            .map(|(a, r, bucket, high, low, n)| Ok((a, r, parse_date(&bucket)?, joined(high, low), n)))
            .collect::<Result<_, StoreError>>()?;
        let actual: Vec<(String, String, String, i64, i64)> = sqlx::query_as(actual_sql).fetch_all(&mut *conn).await?;
        let actual = actual
            .into_iter()
            .map(|(a, r, bucket, amount, n)| {
                // A hand edit is the only way here: name the row and the way out.
                let bucket = parse_date(&bucket).map_err(|_| {
                    StoreError::Unexpected(format!(
                        "the {table} total of {a} / {r} has the malformed date {bucket:?} (stored as YYYY-MM-DD); \
                         rewrite it in that shape, or delete that row of {table}_totals and run `tally verify \
                         --repair`, which writes it again from the ledger"
                    ))
                })?;
                Ok((a, r, bucket, i128::from(amount), n))
            })
            .collect::<Result<_, StoreError>>()?;
        mismatches.extend(diff_totals(table, expected, actual));
    }
    Ok(mismatches)
}

/// Rows one transaction of [`fold_with_parts`] folds: its write lock is held
/// while they travel to Rust and each total they touch is rewritten.
const PARTS_BATCH: u64 = 10_000;

/// Folds the next `max_entries` rows past the cursor the slow way: summed in
/// 128 bits in Rust, each total they touch rewritten as parts
/// ([`add_to_parts`], migration 0011). The rollup comes here only for a batch
/// whose staged fold left 64 bits, so that one (account, resource) cannot
/// hold back everyone's rollup; reads of a total past 64 bits then fail alone
/// (their SUM raises).
async fn fold_with_parts(
    conn: &mut sqlx::SqliteConnection,
    writer: &SqlitePool,
    max_entries: u64,
    before_commit: &BeforeCommit,
) -> Result<u64, StoreError> {
    let mut folded = 0;
    while folded < max_entries {
        let limit = (max_entries - folded).min(PARTS_BATCH);
        // As in write_staged_batch: this process's posts queue in-process.
        let _writer_turn = writer.acquire().await?;
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        static NEXT_ROWS: LazyLock<String> =
            LazyLock::new(|| bucketed_sql(include_str!("sql/sqlite/rollup_next_rows.sql"), Granularity::Day));
        let rows: Vec<(i64, String, String, String, i64)> = sqlx::query_as(&NEXT_ROWS)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&mut *tx)
            .await?;
        let Some(&(last_id, ..)) = rows.last() else { break };
        let mut sums: HashMap<(Granularity, String, String, String), (i128, i64)> = HashMap::new();
        for (_, account, resource, day, amount) in &rows {
            let month = format!("{}01", &day[..8]);
            for key in [
                (Granularity::Day, account.clone(), resource.clone(), day.clone()),
                (Granularity::Month, account.clone(), resource.clone(), month),
            ] {
                let sum = sums.entry(key).or_default();
                *sum = (sum.0 + i128::from(*amount), sum.1 + 1);
            }
        }
        for ((granularity, account, resource, bucket), (amount, entries)) in sums {
            let total = add_to_parts(&mut tx, granularity, &account, &resource, &bucket, amount, entries).await?;
            if i64::try_from(total).is_err() {
                tracing::warn!(
                    %account,
                    %resource,
                    %bucket,
                    "the {} total of {account} / {resource} / {bucket} is past 64 bits of minor units: its reads \
                     fail until entries correct it (docs/operations.md, \"A total past 64 bits\")",
                    match granularity {
                        Granularity::Day => "daily",
                        Granularity::Month => "monthly",
                    }
                );
            }
        }
        sqlx::query("UPDATE rollup_cursor SET last_id = ?1, updated_at = ?2 WHERE name = 'rollup'")
            .bind(last_id)
            .bind(to_micros(Utc::now()))
            .execute(&mut *tx)
            .await?;
        before_commit()?;
        tx.commit().await?;
        folded += rows.len() as u64;
    }
    Ok(folded)
}

/// Adds `amount` (minor units) and `entries` to one total, rewriting it as
/// parts. Part 0, the one the staged fold adds to, keeps a remainder within
/// ±2^62, so later batches add to it in plain SQL again (were it full, every
/// batch touching this total would overflow there and come back here); whole
/// pieces of ±(2^63 − 1), all of one sign, go to parts 1, 2, … Summed in part
/// order, the running sum of such parts stays in 64 bits whenever the total
/// does, so SQLite's SUM raises only for a total that does not fit. Returns
/// the new total.
async fn add_to_parts(
    tx: &mut sqlx::SqliteConnection,
    granularity: Granularity,
    account: &str,
    resource: &str,
    bucket: &str,
    amount: i128,
    entries: i64,
) -> Result<i128, StoreError> {
    let (table, column, _) = shape(granularity);
    let key = format!("account = ?1 AND resource = ?2 AND {column} = ?3");
    let parts: Vec<(i64, i64)> = sqlx::query_as(&format!("SELECT amount, entries FROM {table} WHERE {key}"))
        .bind(account)
        .bind(resource)
        .bind(bucket)
        .fetch_all(&mut *tx)
        .await?;
    let total = parts.iter().map(|(a, _)| i128::from(*a)).sum::<i128>() + amount;
    let mut rest = total;
    let entries = parts.iter().map(|(_, n)| n).sum::<i64>() + entries;
    sqlx::query(&format!("DELETE FROM {table} WHERE {key}"))
        .bind(account)
        .bind(resource)
        .bind(bucket)
        .execute(&mut *tx)
        .await?;
    let full = i128::from(i64::MAX);
    let mut pieces = Vec::new();
    while rest > full / 2 {
        pieces.push(i64::MAX);
        rest -= full;
    }
    while rest < -(full / 2) {
        pieces.push(-i64::MAX);
        rest += full;
    }
    let remainder = i64::try_from(rest).expect("within ±2^62");
    let insert = format!(
        "INSERT INTO {table} (account, resource, {column}, part, amount, entries) VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
    );
    for (part, (amount, entries)) in std::iter::once((remainder, entries))
        .chain(pieces.into_iter().map(|piece| (piece, 0)))
        .enumerate()
    {
        sqlx::query(&insert)
            .bind(account)
            .bind(resource)
            .bind(bucket)
            .bind(i64::try_from(part).unwrap_or(i64::MAX))
            .bind(amount)
            .bind(entries)
            .execute(&mut *tx)
            .await?;
    }
    Ok(total)
}

/// The most rows one multi-row statement of [`insert_entries`] carries: 9
/// parameters each, far below SQLite's 32 766 host parameters.
///
/// [`insert_entries`]: SqliteStore::insert_entries
const MAX_CHUNK_ROWS: usize = 1024;

/// How many of `remaining` rows the next statement takes: the largest power of
/// two up to [`MAX_CHUNK_ROWS`]. Statement sizes are powers of two so there are
/// only 11 distinct SQL texts per kind, each prepared once per connection and
/// kept in sqlx's statement cache, whatever the batch sizes.
fn chunk_len(remaining: usize) -> usize {
    if remaining >= MAX_CHUNK_ROWS {
        MAX_CHUNK_ROWS
    } else {
        1 << remaining.ilog2()
    }
}

/// `(?, …, ?), (?, …, ?), …`: `rows` groups of `width` placeholders.
fn placeholders(rows: usize, width: usize) -> String {
    let group = format!("({})", vec!["?"; width].join(", "));
    vec![group; rows].join(", ")
}

/// The SQL of a chunk of `rows` rows (a power of two), from texts built once.
fn chunk_sql(texts: &'static LazyLock<Vec<String>>, rows: usize) -> &'static str {
    texts[rows.ilog2() as usize].as_str()
}

fn insert_sql(rows: usize) -> String {
    format!(
        "INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key, source, metadata, reverses)
         VALUES {}
         ON CONFLICT (account, idempotency_key) DO NOTHING",
        placeholders(rows, 9)
    )
}

fn select_sql(rows: usize) -> String {
    format!(
        "SELECT {ENTRY_COLUMNS} FROM entries WHERE (account, idempotency_key) IN (VALUES {})",
        placeholders(rows, 2)
    )
}

/// One SQL text per chunk size 1, 2, 4, … [`MAX_CHUNK_ROWS`].
fn texts_by_size(build: fn(usize) -> String) -> Vec<String> {
    (0..=MAX_CHUNK_ROWS.ilog2()).map(|i| build(1 << i)).collect()
}

static INSERT_SQL: LazyLock<Vec<String>> = LazyLock::new(|| texts_by_size(insert_sql));
static SELECT_SQL: LazyLock<Vec<String>> = LazyLock::new(|| texts_by_size(select_sql));

/// Appends `chunk` (at most [`MAX_CHUNK_ROWS`] rows, a power of two) in one
/// statement, skipping rows whose (account, key) exists; the rows it created
/// as (id, account, key).
///
/// Without `RETURNING`: sqlx's SQLite worker hands each result row to the
/// async side separately, which would bring back the per-row hand-off this
/// statement exists to avoid. The statement reports how many rows it inserted
/// and the last id instead. This is the only writer and the transaction holds
/// SQLite's write lock, and AUTOINCREMENT gives each new row one more than the
/// largest id ever used, so when every row went in their ids are consecutive,
/// in row order, ending at the last id. When some were skipped (a retry, a key
/// repeated in the batch), the rows created are the `inserted` largest ids up
/// to the last one; one SELECT reads them.
async fn insert_chunk(
    tx: &mut sqlx::SqliteConnection,
    chunk: &[NewEntry],
    recorded_at: i64,
) -> Result<Vec<(i64, String, String)>, sqlx::Error> {
    let mut query = sqlx::query(chunk_sql(&INSERT_SQL, chunk.len()));
    for entry in chunk {
        query = query
            .bind(entry.account.as_str())
            .bind(entry.resource.as_str())
            .bind(entry.amount.minor())
            .bind(to_micros(entry.occurred_at))
            .bind(recorded_at)
            .bind(entry.idempotency_key.as_str())
            .bind(entry.source.as_deref())
            .bind(entry.metadata.as_deref())
            .bind(entry.reverses);
    }
    let done = query.execute(&mut *tx).await?;
    let inserted = done.rows_affected();
    let last_id = done.last_insert_rowid();
    if inserted == chunk.len() as u64 {
        let first_id = last_id - inserted as i64 + 1;
        return Ok(chunk
            .iter()
            .zip(first_id..)
            .map(|(e, id)| (id, e.account.to_string(), e.idempotency_key.to_string()))
            .collect());
    }
    if inserted == 0 {
        return Ok(Vec::new());
    }
    sqlx::query_as("SELECT id, account, idempotency_key FROM entries WHERE id <= ? ORDER BY id DESC LIMIT ?")
        .bind(last_id)
        .bind(inserted as i64)
        .fetch_all(&mut *tx)
        .await
}

/// The stored rows under the (account, key)s of `chunk` (sized as for
/// [`insert_chunk`]), in one statement.
async fn select_chunk(tx: &mut sqlx::SqliteConnection, chunk: &[&NewEntry]) -> Result<Vec<EntryRow>, sqlx::Error> {
    let mut query = sqlx::query_as(chunk_sql(&SELECT_SQL, chunk.len()));
    for entry in chunk {
        query = query.bind(entry.account.as_str()).bind(entry.idempotency_key.as_str());
    }
    query.fetch_all(&mut *tx).await
}

/// Appends one row unless its (account, key) exists; the new id, or None.
async fn insert_row(
    tx: &mut sqlx::SqliteConnection,
    entry: &NewEntry,
    recorded_at: i64,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key, source, metadata, reverses)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (account, idempotency_key) DO NOTHING
         RETURNING id",
    )
    .bind(entry.account.as_str())
    .bind(entry.resource.as_str())
    .bind(entry.amount.minor())
    .bind(to_micros(entry.occurred_at))
    .bind(recorded_at)
    .bind(entry.idempotency_key.as_str())
    .bind(entry.source.as_deref())
    .bind(entry.metadata.as_deref())
    .bind(entry.reverses)
    .fetch_optional(&mut *tx)
    .await
}

/// An account's plan assignments, by `effective_at` then creation, read on `conn`.
async fn plans_on(conn: &mut sqlx::SqliteConnection, account: &AccountId) -> Result<Vec<PlanAssignment>, StoreError> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT plan, effective_at, created_at FROM account_plans WHERE account = ? ORDER BY effective_at, id",
    )
    .bind(account.as_str())
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|(plan, effective_at, created_at)| plan_from_row(account.as_str(), plan, effective_at, created_at))
        .collect()
}

/// An `account_plans` row of `account`.
fn plan_from_row(
    account: &str,
    plan: String,
    effective_at: i64,
    created_at: i64,
) -> Result<PlanAssignment, StoreError> {
    Ok(PlanAssignment {
        effective_at: from_micros(
            effective_at,
            format_args!("effective_at of plan {plan} of account {account}"),
        )?,
        created_at: from_micros(
            created_at,
            format_args!("created_at of plan {plan} of account {account}"),
        )?,
        plan,
    })
}

/// Minor units used in `period`, read on `conn` in one statement (one
/// snapshot). With a settled watermark (see [`super::settled`]) it sums only
/// the rows after it (entries_unfolded_tail range-scans them); without one,
/// folded totals + the unfolded tail. Either way it also reads the largest id,
/// the new watermark: one writer and AUTOINCREMENT make every row up to it
/// final. Must not run after this transaction wrote to the ledger (the
/// watermark would cover uncommitted rows): `consume` reads before it inserts.
async fn used_on(
    conn: &mut sqlx::SqliteConnection,
    settled: &SettledSums,
    account: &AccountId,
    resource: &ResourceName,
    period: &Period,
) -> Result<i64, StoreError> {
    // SQLite's "integer overflow" names no account: name it once, here.
    read_used(conn, settled, account, resource, period)
        .await
        .map_err(|e| e.naming_used(account, resource))
}

/// How a `used` read sums amounts. A plain SUM is the fast form, but it
/// raises "integer overflow" as soon as its running sum leaves 64 bits, even
/// when the net fits (PostgreSQL adds a `bigint` SUM in `numeric` and
/// answers); the read is then made again in halves ([`joined`]), which
/// costs each summed row two more operations (about a third more on a cold
/// check of a 10 000-row tail, measured), so only then.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SumForm {
    /// `SUM(amount)`, and 0 for the low half.
    Plain,
    /// `SUM(amount >> 32)` and `SUM(amount & 4294967295)`.
    Halves,
}

impl SumForm {
    /// `template` with its `{high}` and `{low}` sums filled in.
    fn sql(self, template: &str) -> String {
        let (high, low) = match self {
            Self::Plain => ("SUM(amount)", "0"),
            Self::Halves => ("SUM(amount >> 32)", "SUM(amount & 4294967295)"),
        };
        template.replace("{high}", high).replace("{low}", low)
    }

    /// The sum read as (`high`, `low`).
    fn join(self, high: i64, low: i64) -> i128 {
        match self {
            Self::Plain => i128::from(high) + i128::from(low),
            Self::Halves => joined(high, low),
        }
    }
}

/// The `used` statements in both [`SumForm`]s: (after a watermark, a
/// period's, all time's), plain first.
static USED_SQL: LazyLock<[[String; 3]; 2]> = LazyLock::new(|| {
    let templates = [
        "SELECT COALESCE(after.high, 0), COALESCE(after.low, 0), (SELECT COALESCE(MAX(id), 0) FROM entries)
           FROM (SELECT {high} AS high, {low} AS low FROM entries
                  WHERE account = ?1 AND resource = ?2 AND id > ?3
                    AND occurred_at >= ?4 AND occurred_at < ?5) AS after",
        include_str!("sql/sqlite/used.sql"),
        include_str!("sql/sqlite/used_total.sql"),
    ];
    [SumForm::Plain, SumForm::Halves].map(|form| templates.map(|template| form.sql(template)))
});

/// [`used_on`], with SQLite's own words for an overflow: plain sums first,
/// in halves if they overflowed on the way.
async fn read_used(
    conn: &mut sqlx::SqliteConnection,
    settled: &SettledSums,
    account: &AccountId,
    resource: &ResourceName,
    period: &Period,
) -> Result<i64, StoreError> {
    match read_used_as(conn, settled, account, resource, period, SumForm::Plain).await {
        Err(StoreError::Overflow { .. }) => {
            read_used_as(conn, settled, account, resource, period, SumForm::Halves).await
        }
        read => read,
    }
}

/// [`read_used`] with sums in `form`.
async fn read_used_as(
    conn: &mut sqlx::SqliteConnection,
    settled: &SettledSums,
    account: &AccountId,
    resource: &ResourceName,
    period: &Period,
    form: SumForm,
) -> Result<i64, StoreError> {
    let [after_sql, period_sql, all_time_sql] = &USED_SQL[usize::from(form == SumForm::Halves)];
    let (from, to) = match (period.starts_at(), period.ends_at()) {
        (Some(from), Some(to)) => (to_micros(from), to_micros(to)),
        _ => (i64::MIN, i64::MAX),
    };
    let lookup = settled.get(account.as_str(), resource.as_str(), bounds(period));
    if let Some(known) = lookup.known {
        let (high, low, mark): (i64, i64, i64) = sqlx::query_as(after_sql)
            .bind(account.as_str())
            .bind(resource.as_str())
            .bind(known.mark)
            .bind(from)
            .bind(to)
            .fetch_one(&mut *conn)
            .await?;
        // A read older than the watermark cannot happen (the watermark was
        // read before this statement began), but if it did, go cold.
        if mark >= known.mark {
            let used = i64::try_from(i128::from(known.sum) + form.join(high, low))
                .map_err(|_| StoreError::used_past_64_bits(account, resource))?;
            settled.offer(
                account.as_str(),
                resource.as_str(),
                bounds(period),
                Settled { mark, sum: used },
                lookup.epoch,
            );
            return Ok(used);
        }
    }
    let (folded_high, folded_low, tail_high, tail_low, mark): (i64, i64, i64, i64, i64) =
        match (period.start, period.end) {
            (Some(start), Some(_)) => {
                let table = if period.window == Window::Day { "day" } else { "month" };
                sqlx::query_as(period_sql)
                    .bind(account.as_str())
                    .bind(resource.as_str())
                    .bind(start.to_string())
                    .bind(from)
                    .bind(to)
                    .bind(table)
                    .fetch_one(&mut *conn)
                    .await?
            }
            _ => {
                sqlx::query_as(all_time_sql)
                    .bind(account.as_str())
                    .bind(resource.as_str())
                    .fetch_one(&mut *conn)
                    .await?
            }
        };
    let used = i64::try_from(form.join(folded_high, folded_low) + form.join(tail_high, tail_low))
        .map_err(|_| StoreError::used_past_64_bits(account, resource))?;
    settled.offer(
        account.as_str(),
        resource.as_str(),
        bounds(period),
        Settled { mark, sum: used },
        lookup.epoch,
    );
    Ok(used)
}

#[derive(FromRow)]
struct OverrideRow {
    account: String,
    resource: String,
    limit_amount: Option<i64>,
    enforcement: Option<String>,
    limit_window: Option<String>,
    expires_at: Option<i64>,
    updated_at: i64,
}

/// One row of `account_override_history`: an override as set, or its removal.
#[derive(FromRow)]
struct OverrideHistoryRow {
    #[sqlx(flatten)]
    row: OverrideRow,
    removed: bool,
}

/// The row stored under an entry's (account, key), with its consume response.
async fn fetch_with_outcome(
    conn: &mut sqlx::SqliteConnection,
    entry: &NewEntry,
) -> Result<Option<(EntryRow, Option<String>)>, sqlx::Error> {
    let row: Option<EntryRow> = sqlx::query_as(&format!(
        "SELECT {ENTRY_COLUMNS} FROM entries WHERE account = ? AND idempotency_key = ?"
    ))
    .bind(entry.account.as_str())
    .bind(entry.idempotency_key.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let response = sqlx::query_scalar("SELECT response FROM consume_outcomes WHERE entry_id = ?")
        .bind(row.id)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(Some((row, response)))
}

/// Parses a stored 'YYYY-MM-DD' bucket, exactly so: chrono also reads
/// '2026-4-2', which no comparison of the stored text would find again.
fn parse_date(text: &str) -> Result<NaiveDate, StoreError> {
    text.parse::<NaiveDate>()
        .ok()
        .filter(|date| date.format("%Y-%m-%d").to_string() == text)
        .ok_or_else(|| {
            StoreError::Unexpected(format!(
                "the database holds a malformed date {text:?} (days are stored as YYYY-MM-DD)"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review BN: spellings of an in-memory database that the URL check
    /// does not know gave each pooled connection a database of its own
    /// ("no such table" after migrating another); SQLite's own answer
    /// refuses them.
    #[tokio::test]
    async fn an_in_memory_database_spelt_in_an_unrecognised_way_is_refused() {
        let catalog = Arc::new(Catalog::builtin());
        // In a folder of the test's own: the store takes its lock file
        // beside the file the URL names before SQLite opens it.
        let folder = tempfile::tempdir().unwrap();
        let folder_name = folder.path().display();
        for url in [
            format!("sqlite:file:{folder_name}/x?vfs=memdb"),
            format!("sqlite:file:{folder_name}/y?mode=%6Demory"),
        ] {
            assert!(
                !super::super::sqlite_in_memory(&url),
                "{url} is recognised now: test another"
            );
            let refused = SqliteStore::connect(&url, catalog.clone()).await;
            let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(message.contains("opens an in-memory database"), "{url}: {message:?}");
        }
        let file = format!("sqlite://{folder_name}/tally.db");
        assert!(SqliteStore::connect(&file, catalog).await.is_ok(), "a file is taken");
    }

    /// A `used` read that looked its sum up before the settled sums were
    /// forgotten (a repair noticed meanwhile), and offers after, offers in
    /// vain: it may have summed the old totals. The read is made slow with a
    /// view, the one way to hold a SQLite read between its lookup and its
    /// offer (a SQLite reader waits on no lock).
    #[tokio::test]
    async fn a_used_read_in_flight_across_a_forgetting_offers_in_vain() {
        let mut conn = sqlx::SqliteConnection::connect("sqlite::memory:").await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE ledger (id INTEGER PRIMARY KEY, account TEXT, resource TEXT, amount INTEGER,
                                  occurred_at INTEGER);
             INSERT INTO ledger VALUES (1, 'acme', 'ai_generations', 1, 0);
             -- Every read of `entries` counts to two million first.
             CREATE VIEW entries AS
             SELECT l.* FROM ledger AS l,
                    (WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000000)
                     SELECT MAX(i) AS m FROM n) AS slow
              WHERE slow.m > 0",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        let account = AccountId::parse("acme").unwrap();
        let resource = ResourceName::parse("ai_generations").unwrap();
        let period = Period::containing(Window::Total, Utc::now());
        let sums = SettledSums::default();
        let epoch = sums.get("acme", "ai_generations", bounds(&period)).epoch;
        sums.offer(
            "acme",
            "ai_generations",
            bounds(&period),
            Settled { mark: 0, sum: 5 },
            epoch,
        );

        let started = std::time::Instant::now();
        let reading = async {
            let used = read_used_as(&mut conn, &sums, &account, &resource, &period, SumForm::Plain).await;
            (used, started.elapsed())
        };
        let forgetting = async {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            sums.clear();
            started.elapsed()
        };
        let ((used, read_after), forgot_after) = tokio::join!(reading, forgetting);
        assert_eq!(used.unwrap(), 6, "from the sum looked up: the read was in flight");
        assert!(
            read_after > forgot_after,
            "the read ended before the forgetting: make the view slower"
        );
        assert_eq!(
            sums.get("acme", "ai_generations", bounds(&period)).known,
            None,
            "the read in flight put its sum back after the forgetting"
        );
    }

    #[tokio::test]
    async fn a_connection_left_counted_inside_a_transaction_is_replaced_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let store = SqliteStore::connect(&url, Arc::new(Catalog::builtin())).await.unwrap();
        store.migrate().await.unwrap();
        {
            // sqlx counts a transaction that never ends: what a failed
            // commit leaves (its rollback at the drop fails too).
            let mut connection = store.writer.acquire().await.unwrap();
            let never_ended = sqlx::Connection::begin(&mut *connection).await.unwrap();
            std::mem::forget(never_ended);
        }
        let entry = NewEntry {
            account: crate::domain::AccountId::parse("acme").unwrap(),
            resource: crate::domain::ResourceName::parse("api_requests").unwrap(),
            amount: crate::domain::Amount::from_minor(1, 0),
            idempotency_key: crate::domain::IdempotencyKey::parse("after-a-leak").unwrap(),
            occurred_at: Utc::now().trunc_subsecs(6),
            occurred_at_given: false,
            source: None,
            metadata: None,
            reverses: None,
        };
        let posted = store.insert_entries(std::slice::from_ref(&entry)).await;
        assert!(posted.is_ok(), "{posted:?}");
    }

    #[tokio::test]
    async fn an_in_memory_database_keeps_a_connection_for_the_life_of_the_store() {
        for url in ["sqlite::memory:", "sqlite:file::memory:", "sqlite:?mode=memory"] {
            let store = SqliteStore::connect(url, Arc::new(Catalog::builtin())).await.unwrap();
            let options = store.writer.options();
            assert_eq!(options.get_min_connections(), 1, "{url}");
            assert_eq!(options.get_idle_timeout(), None, "{url}");
            assert_eq!(options.get_max_lifetime(), None, "{url}");
        }
    }
}
