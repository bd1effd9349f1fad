//! Storage: one trait, one implementation per database engine.
//!
//! HTTP handlers and jobs talk to `dyn Store`, never to a pool. Queries are
//! runtime-checked (`sqlx::query_as` + `FromRow`); there is no `sqlx::Any`,
//! which lacks NUMERIC, timestamptz and Decimal.

pub mod postgres;
pub mod settled;
pub mod sqlite;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use futures_util::stream::BoxStream;

use crate::domain::catalog::{Enforcement, Window};
use crate::domain::period::Granularity;
use crate::domain::plan::{DefaultPlanChange, Override, OverrideChange, Period, PlanAssignment};
use crate::domain::{
    AccountId, Amount, ApiKey, Catalog, Entry, EntryFilter, IdempotencyKey, InsertOutcome, InsertStatus, NewEntry,
    ResourceName, Role,
};

/// Which database engine a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Embedded SQLite (the default).
    Sqlite,
    /// PostgreSQL (production).
    Postgres,
}

/// What can go wrong in the store, small enough for callers to match on.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The row asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An idempotency key was reused with different content.
    #[error("{}{message}", index.map(|i| format!("entry {i}: ")).unwrap_or_default())]
    IdempotencyConflict {
        /// Index of the offending entry in a batch; `None` for a request
        /// of one entry (a consume), whose message needs no position.
        index: Option<usize>,
        /// What differs.
        message: String,
    },
    /// The entry already has a reversal.
    #[error("{}", already_reversed(&format!("entry {}", .0)))]
    AlreadyReversed(i64),
    /// A request that contradicts what is stored (e.g. reversing a reversal).
    #[error("{0}")]
    Invalid(String),
    /// The database answered what this version cannot read or represent: a
    /// bug or a corrupt row; never the client's doing (500, details to the
    /// log).
    #[error("{0}")]
    Unexpected(String),
    /// A sum past 64 bits of minor units (PostgreSQL's and SQLite's own
    /// overflow errors): a total too large to read, never wrapped
    /// (invariant 6); 500, like [`StoreError::Unexpected`].
    #[error(
        "a sum passed the 64-bit range of minor units ({detail}): a daily or monthly total, or a sum a read or \
         report needs, is too large; {OVERFLOW_ADVICE}"
    )]
    Overflow {
        /// Which sum (a total named, or the database's own words).
        detail: String,
    },
    /// The database cannot be reached or is overloaded.
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// The database is up but cannot answer this yet without giving a wrong
    /// answer (a read waiting on writes in flight); retry shortly (503).
    #[error("{0}")]
    Busy(String),
    /// This request and a concurrent one waited on each other and
    /// PostgreSQL cancelled this one to break the deadlock (or they could
    /// not both commit as if one after the other): nothing it wrote was
    /// kept, and sent again it passes (503).
    #[error(
        "this request and a concurrent one waited on each other, and the database cancelled this one; \
         nothing it wrote was kept: send it again"
    )]
    Contended(#[source] sqlx::Error),
    /// Anything else; the cause goes to the log, not to clients.
    #[error("database error")]
    Internal(#[source] sqlx::Error),
}

impl StoreError {
    /// No entry has this id: the same words wherever an entry is missing,
    /// or must look missing to the caller.
    pub fn entry_not_found(id: i64) -> Self {
        StoreError::NotFound(format!("entry {id} does not exist"))
    }

    /// The key was free when looked up but taken before this insert landed,
    /// by a concurrent request whose outcome a retry will get.
    pub fn key_taken(index: Option<usize>) -> Self {
        StoreError::IdempotencyConflict {
            index,
            message: "the idempotency key was taken by a concurrent request; retry to get its outcome".into(),
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) | sqlx::Error::Tls(_) => {
                StoreError::Unavailable(e)
            }
            sqlx::Error::Database(ref db) if is_unavailable_code(db.code().as_deref()) => StoreError::Unavailable(e),
            sqlx::Error::Database(ref db) if is_overflow(db.as_ref()) => StoreError::overflow(db.message()),
            // deadlock_detected, serialization_failure.
            sqlx::Error::Database(ref db) if matches!(db.code().as_deref(), Some("40P01" | "40001")) => {
                StoreError::Contended(e)
            }
            other => StoreError::Internal(other),
        }
    }
}

impl StoreError {
    /// PostgreSQL refused this role a table (SQLSTATE 42501): a grant is
    /// missing, which waiting does not change.
    pub fn is_permission_denied(&self) -> bool {
        matches!(self, StoreError::Internal(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42501"))
    }

    /// What is used of `resource` by `account` does not fit 64-bit minor units.
    pub(crate) fn used_past_64_bits(account: &AccountId, resource: &ResourceName) -> Self {
        StoreError::overflow(&format!("{resource} used by {account}"))
    }

    /// This error, an overflow named for the `used` read that raised it (the
    /// database's own words name no account).
    pub(crate) fn naming_used(self, account: &AccountId, resource: &ResourceName) -> Self {
        match self {
            StoreError::Overflow { .. } => StoreError::used_past_64_bits(account, resource),
            other => other,
        }
    }

    /// A sum past 64 bits (the database said `detail`): what it means and
    /// where the way out is documented.
    pub(crate) fn overflow(detail: &str) -> Self {
        StoreError::Overflow {
            detail: detail.to_owned(),
        }
    }
}

/// Where the way out of a sum past 64 bits is documented.
pub(crate) const OVERFLOW_ADVICE: &str =
    "docs/operations.md, \"A total past 64 bits\", says how to find and correct the entries";

/// What can go wrong opening a store: reading its URL, connecting,
/// migrating the database, and checking it can be used as it is.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URL names neither SQLite nor PostgreSQL (given with its password
    /// hidden, [`redact_url`]).
    #[error("unsupported database URL {0:?}; use sqlite://FILE or postgres://USER@HOST/DB")]
    UnsupportedUrl(String),
    /// A `sqlite:` URL sqlx cannot read.
    #[error("cannot read the SQLite URL {url:?}")]
    SqliteUrl {
        /// The URL as given.
        url: String,
        /// Why sqlx refused it.
        #[source]
        source: sqlx::Error,
    },
    /// A `sqlite:` URL with no file name (`sqlite://`): SQLite would open a
    /// private temporary database per connection, so the schema one made
    /// would be missing from the next.
    #[error("the SQLite URL {0:?} names no file; give one, such as sqlite://tally.db (the default)")]
    SqliteNoFile(String),
    /// A `postgres:` URL sqlx cannot read. The URL is not repeated: it may
    /// hold a password.
    #[error("cannot read the PostgreSQL URL: {source}{}", postgres_url_hint(source))]
    PostgresUrl {
        /// Why sqlx refused it.
        source: sqlx::Error,
    },
    /// The PostgreSQL server did not answer a connection within `seconds`.
    #[error(
        "the PostgreSQL server did not answer within {seconds} s: check the host and port, and that \
         no firewall drops the connection"
    )]
    NoAnswer {
        /// How long it was given.
        seconds: u64,
    },
    /// The PostgreSQL server answered, but kept refusing connections as
    /// not ready (SQLSTATE 57P03) for all of `seconds`, or answered so and
    /// then could not be reached until then (`then_gone`).
    #[error(
        "the PostgreSQL server did not accept connections within {seconds} s: it answered \"{why}\"{}; if it is \
         starting or recovering, start Tally again once it is up; if it is a standby, connect to the primary \
         (or promote it)",
        then_gone.as_deref().map_or_else(String::new, |gone| format!(", and later could not be reached ({})", gone.briefly()))
    )]
    NotAcceptingConnections {
        /// How long it was waited for.
        seconds: u64,
        /// What the server last said, with its detail.
        why: String,
        /// Why the last attempt failed, when the server had gone away
        /// (restarting) rather than refused again. Said in the message in
        /// brief, without its advice on the URL (the URL had reached the
        /// server), so not a source too.
        then_gone: Option<Box<OpenError>>,
    },
    /// The URL names a Unix socket that is not there.
    #[error(
        "no PostgreSQL socket at {path}: check the port in the URL (a server's socket is named after the port \
         it listens on) and the socket folder (host=), and that the server is running"
    )]
    NoSocket {
        /// The socket's full path.
        path: String,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// SQLite cannot write the database file or create its companions.
    #[error(
        "SQLite cannot write {} or beside it: Tally keeps a write-ahead log next to the file (its -wal and \
         -shm files), which SQLite creates even to read, so the file and its folder must be writable by the \
         user Tally runs as; or work on a copy in a writable folder",
        file.display()
    )]
    SqliteNotWritable {
        /// The database file.
        file: std::path::PathBuf,
        /// What SQLite said.
        #[source]
        source: sqlx::Error,
    },
    /// Connecting to the database, or a query while opening it, failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// sqlx could not run the migrations.
    #[error("cannot run database migrations")]
    Migrations(#[source] sqlx::migrate::MigrateError),
    /// The database holds a migration this binary lacks.
    #[error(
        "this database was migrated by a newer Tally (it holds migration {version:04}; this binary knows \
         migrations up to {latest:04}): run the Tally version that migrated it, or restore a backup taken \
         before that upgrade; an older binary cannot know what the newer migrations changed"
    )]
    NewerTally {
        /// The unknown migration's version.
        version: i64,
        /// The latest migration this binary knows.
        latest: i64,
    },
    /// The ledger's newest transaction id could not be read (PostgreSQL).
    #[error("cannot read the ledger's newest transaction id")]
    LedgerTransactionId(#[source] sqlx::Error),
    /// A transaction id PostgreSQL gave as text is not a number.
    #[error(transparent)]
    TransactionIdText(#[from] std::num::ParseIntError),
    /// The ledger holds transaction ids this PostgreSQL cluster has not
    /// reached: a dump restored into another cluster.
    #[error(
        "this database's ledger holds PostgreSQL transaction ids up to {newest}, but this cluster has only \
         reached {next}: the database was restored from a dump into another cluster. New entries would get \
         smaller ids than the ledger's and never count toward quotas, totals or exports, so Tally will not \
         use it. Stop the cluster, move its ids past the ledger's with `pg_resetwal -e {epoch} -D DATADIR` \
         (as the cluster's owner, once, while it is stopped), and start it again; docs/operations.md, \
         \"Restoring a PostgreSQL dump\", has the steps",
        epoch = (.newest >> 32) + 1
    )]
    ClusterBehindLedger {
        /// The newest transaction id in the ledger.
        newest: u64,
        /// The next transaction id of the cluster.
        next: u64,
    },
}

impl OpenError {
    /// What went wrong without the advice: for a failure quoted inside
    /// another message.
    fn briefly(&self) -> String {
        match self {
            Self::NoSocket { path, source } => format!("no socket at {path}: {source}"),
            Self::NoAnswer { seconds } => format!("no answer within {seconds} s"),
            other => crate::telemetry::cause_chain(other),
        }
    }

    /// Whether the error already says what to check, so a caller's general
    /// advice on opening a database would only mislead (a folder that must
    /// exist, for a folder that exists but is read-only).
    pub fn says_what_to_do(&self) -> bool {
        matches!(
            self,
            Self::UnsupportedUrl(_)
                | Self::PostgresUrl { .. }
                | Self::NoAnswer { .. }
                | Self::NotAcceptingConnections { .. }
                | Self::NoSocket { .. }
                | Self::SqliteNotWritable { .. }
                | Self::SqliteNoFile(_)
                // A URL refused for what it says (a parameter sqlx does not
                // know; an in-memory database spelt in a way Tally does not
                // take, found once SQLite opened it): advice on folders and
                // servers would mislead.
                | Self::SqliteUrl { .. }
                | Self::Database(sqlx::Error::Configuration(_))
        )
    }
}

/// What to write instead of a PostgreSQL URL sqlx refused, where that is
/// known: libpq takes `postgres://USER@/DB?host=/run/postgresql` (no host
/// before the path, a socket folder after it), sqlx does not.
fn postgres_url_hint(error: &sqlx::Error) -> &'static str {
    if error.to_string().contains("empty host") {
        "; name a host before the database: postgres://USER@localhost/DB over TCP, or for a Unix socket \
         postgres://USER@localhost/DB?host=/run/postgresql (the socket's folder; host= then takes precedence)"
    } else {
        ""
    }
}

/// "Try again later", not a bug: SQLite's BUSY and LOCKED (5, 6, 517) and
/// FULL (13: the disk is full, until an operator frees it); PostgreSQL's
/// "cannot connect now", "too many connections", "insufficient resources",
/// a server shutting down or restarting under the session (57P01
/// admin_shutdown, 57P02 crash_shutdown: review BO found these answered 500
/// while consumes in the same restart got 503) and the connection
/// exceptions of class 08.
fn is_unavailable_code(code: Option<&str>) -> bool {
    matches!(
        code,
        Some("5" | "6" | "517" | "13" | "57P01" | "57P02" | "57P03" | "53300" | "53000")
    ) || code.is_some_and(|code| code.starts_with("08"))
}

/// PostgreSQL's `numeric_value_out_of_range` (a `bigint` sum or cast) and
/// SQLite's integer `SUM` overflow: amounts past 64 bits (invariant 6 makes
/// them errors, never wrapped numbers).
fn is_overflow(db: &dyn sqlx::error::DatabaseError) -> bool {
    db.code().as_deref() == Some("22003") || db.message() == "integer overflow"
}

/// The default plan last recorded ([`Store::recorded_default_plan`]), on
/// either engine.
pub(crate) const LAST_DEFAULT_PLAN: &str = "SELECT plan FROM default_plans ORDER BY id DESC LIMIT 1";

/// The ledger and everything around it, on one database.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The engine behind this store.
    fn backend(&self) -> Backend;

    /// Runs pending migrations, then checks the database can be used as it
    /// is (PostgreSQL: its cluster's transaction ids are ahead of the
    /// ledger's). Every command that opens a store goes through here.
    async fn migrate(&self) -> Result<(), OpenError>;

    /// Why a new connection to the database fails now, from one attempt
    /// outside the pool (which retries a refused connection until its
    /// acquire timeout and then says only that it timed out); `None` when
    /// the attempt succeeds, or where there is no server to reach (SQLite).
    async fn why_unreachable(&self) -> Option<String> {
        None
    }

    /// Closes the store's connections at the end of a process, waiting a
    /// few seconds at most for those in use. On SQLite the write-ahead log
    /// is checkpointed into the database file first (PASSIVE), so that the
    /// file alone (a copy of `tally.db` without `tally.db-wal`) holds every
    /// commit; while another process reads, commits may stay in the -wal
    /// file (logged).
    /// Nothing may use the store afterwards.
    async fn close(&self);

    /// Appends a batch, all or nothing. An entry whose (account, key) exists
    /// with the same content is a duplicate; with other content the whole batch
    /// fails with [`StoreError::IdempotencyConflict`].
    async fn insert_entries(&self, entries: &[NewEntry]) -> Result<Vec<InsertOutcome>, StoreError>;

    /// Appends one entry, as [`Store::insert_entries`] does, but a conflict
    /// names no batch position ("entry 0: …" would mean nothing to the
    /// caller of one entry: a reversal, `tally post`, an import's retried line).
    async fn insert_entry(&self, entry: &NewEntry) -> Result<InsertOutcome, StoreError> {
        match self.insert_entries(std::slice::from_ref(entry)).await {
            Ok(mut outcomes) => Ok(outcomes.pop().expect("one outcome per entry")),
            Err(StoreError::IdempotencyConflict { message, .. }) => {
                Err(StoreError::IdempotencyConflict { index: None, message })
            }
            Err(e) => Err(e),
        }
    }

    /// Which of these (account, key) pairs the ledger holds an entry under,
    /// in one read: a flag per pair, in order.
    async fn holds_keys(&self, keys: &[(&AccountId, &IdempotencyKey)]) -> Result<Vec<bool>, StoreError>;

    /// One entry by id.
    async fn entry(&self, id: i64) -> Result<Entry, StoreError>;

    /// Ledger rows in ascending id order.
    async fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<Entry>, StoreError>;

    /// Stores a new key's hash.
    async fn create_api_key(&self, new: &NewApiKey) -> Result<ApiKey, StoreError>;

    /// The unrevoked key with this hash, if any.
    async fn api_key_by_hash(&self, hash: &str) -> Result<Option<ApiKey>, StoreError>;

    /// Every key, revoked ones included.
    async fn list_api_keys(&self) -> Result<Vec<ApiKey>, StoreError>;

    /// Revokes a key; revoking twice keeps the first time.
    async fn revoke_api_key(&self, id: i64) -> Result<ApiKey, StoreError>;

    /// Stores `new` only if the database has no key at all, revoked ones
    /// included (the bootstrap admin key); `None` when one exists. Atomic:
    /// of several processes starting at once on a new database, one stores
    /// its key.
    async fn create_first_api_key(&self, new: &NewApiKey) -> Result<Option<ApiKey>, StoreError>;

    /// Folds the next batch of at most `max_entries` ledger rows into the daily
    /// and monthly totals and moves the cursor, in one transaction. Returns how
    /// many rows it folded (0: caught up). `before_commit` runs just before the
    /// commit; an error from it rolls the batch back (tests use it as a failpoint).
    async fn rollup_batch(&self, max_entries: u32, before_commit: &BeforeCommit) -> Result<u64, StoreError>;

    /// About how many ledger rows the rollup has not folded yet (cheap: from
    /// the ids, not a count), to size the next batch.
    async fn unfolded_estimate(&self) -> Result<u64, StoreError>;

    /// The most rows one rollup batch (one transaction) folds on this engine.
    fn rollup_batch_cap(&self) -> u32;

    /// Forgets the settled sums behind `used` (see [`settled`]), so that the
    /// next read of each period is cold: sums its folded totals and its whole
    /// unfolded tail. After `repair_totals`, and for the benchmark, which
    /// times that read too.
    fn forget_settled_sums(&self);

    /// Whether the ledger holds any entry of `resource` (of `account`, when
    /// given). A resource dropped from the catalog stays readable by name
    /// while it does.
    async fn ledger_has_resource(
        &self,
        account: Option<&AccountId>,
        resource: &ResourceName,
    ) -> Result<bool, StoreError>;

    /// When the oldest ledger row not yet folded was recorded (None: caught up).
    async fn oldest_unfolded(&self) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// A mark of the ledger rows committed so far, for
    /// [`Store::oldest_unfolded_by`] to ask later which of them are still
    /// unfolded.
    async fn committed_so_far(&self) -> Result<CommittedMark, StoreError>;

    /// When the oldest ledger row committed by `mark` and not yet folded was
    /// recorded (None: all of them are folded). Rows committed after `mark`
    /// do not count, however old their `recorded_at`.
    async fn oldest_unfolded_by(&self, mark: &CommittedMark) -> Result<Option<DateTime<Utc>>, StoreError>;

    /// Sparse (bucket, minor units) of one account and resource in [from, to):
    /// folded totals plus the unfolded tail, read in one statement. A bucket may
    /// appear twice (folded and tail); the caller adds them.
    async fn bucket_totals(
        &self,
        account: &AccountId,
        resource: &ResourceName,
        granularity: Granularity,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<(NaiveDate, i64)>, StoreError>;

    /// Recomputes every daily and monthly total from the folded ledger rows and
    /// lists the differences, all read in one snapshot.
    async fn verify_totals(&self) -> Result<Vec<TotalMismatch>, StoreError>;

    /// What [`Store::verify_totals`] lists, each total then rewritten to what
    /// its folded ledger rows say (a total with none behind it removed), in
    /// one transaction that no rollup batch can run beside. Returns the
    /// totals rewritten. The ledger is not touched.
    async fn repair_totals(&self) -> Result<Vec<TotalMismatch>, StoreError>;

    /// The daily and monthly totals whose amount is past 64 bits of minor
    /// units, which every read that needs them refuses: to name them in that
    /// refusal (the database's overflow error names none).
    async fn totals_past_64_bits(&self) -> Result<Vec<TotalName>, StoreError>;

    /// Takes the lock that keeps two runs of a job apart: across processes on
    /// PostgreSQL (an advisory lock), within this process only on SQLite, so
    /// every job tolerates a run of another process at the same time (the
    /// rollup re-reads its cursor under the write lock; reports keep the
    /// file the other run wrote). `None` when another run holds it.
    async fn try_job_lock(&self, job: &str) -> Result<Option<JobLock>, StoreError>;

    /// Records that `account` is on `plan` from `effective_at` (history is kept).
    async fn assign_plan(
        &self,
        account: &AccountId,
        plan: &str,
        effective_at: DateTime<Utc>,
    ) -> Result<PlanAssignment, StoreError>;

    /// The fractional digits recorded for each resource (migration 0021):
    /// (resource, digits). See [`reconcile_digits`].
    async fn recorded_digits(&self) -> Result<Vec<(String, i64)>, StoreError>;

    /// Whether the database holds amounts of `resource`: an entry, or an
    /// override (current or past), both stored in its minor unit.
    async fn holds_amounts_of(&self, resource: &str) -> Result<bool, StoreError>;

    /// Records these digits for these resources: where digits are recorded
    /// already, replacing them with `replace`, else keeping them.
    async fn record_digits(&self, digits: &[(String, u32)], replace: bool) -> Result<(), StoreError>;

    /// The default plan last recorded by [`Store::record_default_plan`];
    /// `None` before the first record.
    async fn recorded_default_plan(&self) -> Result<Option<String>, StoreError>;

    /// Records `catalog.default_plan` as the default in force, when it is
    /// not already the one last recorded. When it replaces another, every
    /// account already known that is on the default at some instant is
    /// assigned the previous default from the start (while the catalog
    /// still has it), in the same transaction: "new accounts get
    /// default_plan", and the months already billed stay as they were.
    /// Writes nothing when the default is unchanged (a read-only database
    /// opens as before); `None` then, and on the first record.
    async fn record_default_plan(&self, catalog: &Catalog) -> Result<Option<DefaultPlanChange>, StoreError>;

    /// Every plan assignment of an account, by `effective_at` then creation.
    async fn plan_history(&self, account: &AccountId) -> Result<Vec<PlanAssignment>, StoreError>;

    /// Each plan some account is on at `at` or is assigned from a later
    /// instant, with how many such accounts, by plan name. Reads every
    /// account's history: for startup checks, not for a request's path.
    async fn plans_in_force(&self, at: DateTime<Utc>) -> Result<Vec<(String, i64)>, StoreError>;

    /// Sets (replaces) an account's override for one resource.
    async fn put_override(&self, account: &AccountId, value: &Override) -> Result<(), StoreError>;

    /// Removes an override; false if there was none.
    /// `removed_at` is the instant the removal is recorded at in the history:
    /// the same clock as the `updated_at` of the overrides it follows.
    async fn delete_override(
        &self,
        account: &AccountId,
        resource: &ResourceName,
        removed_at: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// [`Store::plan_history`] and every change to the account's overrides
    /// (each set, each removal) in the order made, read together: the
    /// override in force at an instant is the latest change made by then
    /// (`overrides_as_of`), as the plan in force is the latest assignment
    /// effective by then.
    async fn plans_and_override_changes(
        &self,
        account: &AccountId,
    ) -> Result<(Vec<PlanAssignment>, Vec<OverrideChange>), StoreError>;

    /// What a quota check reads: [`Store::plans_and_override_changes`] and `used`
    /// in `likely` (the period the check most likely counts in). An engine may
    /// read all of it in one statement (one round trip, one snapshot).
    async fn check_inputs(
        &self,
        account: &AccountId,
        resource: &ResourceName,
        likely: &Period,
    ) -> Result<CheckInputs, StoreError> {
        let (plans, override_changes) = self.plans_and_override_changes(account).await?;
        let used = self.used(account, resource, likely).await?;
        Ok(CheckInputs {
            plans,
            override_changes,
            used,
        })
    }

    /// Minor units used in `period`: folded totals plus the unfolded tail, in
    /// one statement, exact at the moment of the call.
    async fn used(&self, account: &AccountId, resource: &ResourceName, period: &Period) -> Result<i64, StoreError>;

    /// Resources the account has any entry for.
    async fn used_resources(&self, account: &AccountId) -> Result<Vec<String>, StoreError>;

    /// Checks and records atomically: under a per-(account, resource) lock,
    /// reads the account's plan history and overrides, `used` for the period
    /// `decide` picks from them, asks `decide`, and appends `entry` with the
    /// response `decide` returned — or nothing if it refused. The limits are
    /// read under the lock, so a plan or override committed before it is
    /// granted is seen. An entry already stored under the key is replayed,
    /// not recorded again.
    async fn consume(&self, entry: &NewEntry, decide: &dyn ConsumeDecider) -> Result<ConsumeResult, StoreError>;

    /// Consume decided by the database itself, in one round trip: under the
    /// same per-(account, resource) lock as [`Store::consume`], it reads the
    /// plan in force and the override, `used`, decides against `rules`, and
    /// records. A consume dated by its caller is held to the limit in force
    /// at `now` too, as [`ConsumeDecider`]s hold it. `Ok(None)`: the engine
    /// has no such path, or not for this consume (use [`Store::consume`]).
    /// Only for resources without a per-minute rate (rates are counted in
    /// process, under the lock of `consume`).
    async fn consume_decided(
        &self,
        _entry: &NewEntry,
        _rules: ConsumeRules,
        _now: DateTime<Utc>,
    ) -> Result<Option<DecidedConsume>, StoreError> {
        Ok(None)
    }

    /// Writes the ledger rows whose occurred_at is in the filter's range, as
    /// the entries export's CSV lines (no header), ascending id, streamed in
    /// chunks of whole lines (memory stays flat however many rows). Returns
    /// the row count.
    async fn export_entries(&self, filter: &ExportFilter, sink: &mut dyn CsvSink) -> Result<u64, StreamError>;

    /// Writes the totals per (account, resource, bucket) of the filter's range
    /// as the daily or monthly export's CSV lines (no header), ascending by
    /// account and resource (byte order) and bucket: the folded totals plus the
    /// unfolded tail read in one snapshot, or recomputed from the ledger as of
    /// the filter's `as_of`. Streamed like [`Store::export_entries`].
    async fn export_totals(
        &self,
        granularity: Granularity,
        filter: &ExportFilter,
        sink: &mut dyn CsvSink,
    ) -> Result<u64, StreamError>;

    /// Totals per (account, resource, bucket), ascending, streamed: folded
    /// totals plus the unfolded tail, or recomputed from the ledger as of the
    /// filter's `as_of`.
    fn stream_totals<'a>(
        &'a self,
        granularity: Granularity,
        filter: &'a ExportFilter,
    ) -> BoxStream<'a, Result<TotalRow, StoreError>>;

    /// Every plan assignment of every account, by account then effective_at.
    async fn all_plan_assignments(&self) -> Result<Vec<(String, PlanAssignment)>, StoreError>;

    /// Every change of every account's overrides (set or removed), by
    /// account, resource, then the order they were made in; with `as_of`,
    /// only those made at or before it.
    async fn override_history(&self, as_of: Option<DateTime<Utc>>)
    -> Result<Vec<(String, OverrideChange)>, StoreError>;
}

/// What an export covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportFilter {
    /// First day (inclusive).
    pub from: NaiveDate,
    /// Last day (exclusive).
    pub to: NaiveDate,
    /// Only this account.
    pub account: Option<AccountId>,
    /// Only this resource.
    pub resource: Option<ResourceName>,
    /// Only entries recorded at or before this instant.
    pub as_of: Option<DateTime<Utc>>,
}

/// Where a store writes an export's CSV lines.
pub trait CsvSink: Send {
    /// Appends `lines`, which hold `rows` whole CSV records.
    fn write_lines(&mut self, lines: &[u8], rows: u64) -> std::io::Result<()>;
}

/// Why a second reversal of `entry` (named as the reader knows it: a
/// ledger id, or a file's own id in `tally import`) is refused.
pub fn already_reversed(entry: &str) -> String {
    format!("{entry} is already reversed; a second reversal would count the correction twice")
}

/// Why the store stopped streaming an export's rows (its CSV lines).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Reading the database failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// Reading the database through the exports' own SQLite connection failed.
    #[error("database error")]
    Sqlite(#[source] rusqlite::Error),
    /// Writing the output failed.
    #[error("cannot write the export")]
    Write(#[source] std::io::Error),
    /// A stored value cannot be written (e.g. a total overflowing 64 bits).
    #[error("cannot export: {0}")]
    Data(String),
}

impl From<sqlx::Error> for StreamError {
    fn from(e: sqlx::Error) -> Self {
        StreamError::Store(e.into())
    }
}

impl From<rusqlite::Error> for StreamError {
    fn from(e: rusqlite::Error) -> Self {
        match &e {
            // The same words as through sqlx (`is_overflow`).
            rusqlite::Error::SqliteFailure(_, Some(message)) if message == "integer overflow" => {
                StreamError::Store(StoreError::overflow(message))
            }
            _ => StreamError::Sqlite(e),
        }
    }
}

impl From<crate::export::format::FormatError> for StreamError {
    fn from(e: crate::export::format::FormatError) -> Self {
        StreamError::Data(e.0)
    }
}

/// CSV lines on their way to a [`CsvSink`], handed over in chunks of about
/// [`CHUNK_BYTES`](crate::export::format::CHUNK_BYTES).
pub(crate) struct Chunk {
    pub bytes: Vec<u8>,
    pub rows: u64,
    pub total_rows: u64,
}

impl Chunk {
    pub(crate) fn new() -> Self {
        Self {
            bytes: Vec::with_capacity(crate::export::format::CHUNK_BYTES + 4096),
            rows: 0,
            total_rows: 0,
        }
    }

    /// Counts the line just appended; true when the chunk is full.
    pub(crate) fn line_done(&mut self) -> bool {
        self.rows += 1;
        self.bytes.len() >= crate::export::format::CHUNK_BYTES
    }

    /// Hands what is buffered to `sink`.
    pub(crate) fn flush(&mut self, sink: &mut dyn CsvSink) -> Result<(), StreamError> {
        if self.rows > 0 {
            sink.write_lines(&self.bytes, self.rows).map_err(StreamError::Write)?;
        }
        self.total_rows += self.rows;
        self.bytes.clear();
        self.rows = 0;
        Ok(())
    }
}

/// Checks that folded totals arrive in strictly ascending byte order, which
/// the merge with the tail relies on: a database sorting otherwise would
/// split a key's total silently, so it fails loudly instead. Reuses its
/// buffers (no allocation per row once warm).
#[derive(Default)]
pub(crate) struct AscendingKeys {
    account: Vec<u8>,
    resource: Vec<u8>,
    bucket: Option<NaiveDate>,
}

impl AscendingKeys {
    /// Accepts the next key, or errs when it does not come after the last.
    pub(crate) fn advance(&mut self, account: &[u8], resource: &[u8], bucket: NaiveDate) -> Result<(), StreamError> {
        if let Some(last) = self.bucket
            && (account, resource, bucket) <= (self.account.as_slice(), self.resource.as_slice(), last)
        {
            return Err(StreamError::Data(format!(
                "totals arrived out of byte order ({} / {} / {bucket} after {} / {} / {last}); \
                     the database's collation is not byte order: export from a database created with \
                     LC_COLLATE 'C' or report this",
                String::from_utf8_lossy(account),
                String::from_utf8_lossy(resource),
                String::from_utf8_lossy(&self.account),
                String::from_utf8_lossy(&self.resource),
            )));
        }
        self.account.clear();
        self.account.extend_from_slice(account);
        self.resource.clear();
        self.resource.extend_from_slice(resource);
        self.bucket = Some(bucket);
        Ok(())
    }
}

/// A total of the unfolded tail, merged into the folded totals of the same key.
pub(crate) struct TailTotal {
    pub account: String,
    pub resource: String,
    pub bucket: NaiveDate,
    /// Minor units, in 128 bits: a tail alone may leave 64 bits where the
    /// folded total it joins brings the sum back.
    pub amount: i128,
    pub entries: i64,
}

impl TailTotal {
    /// Orders this tail total against a folded key, in export order.
    pub(crate) fn cmp_key(&self, account: &[u8], resource: &[u8], bucket: NaiveDate) -> std::cmp::Ordering {
        (self.account.as_bytes(), self.resource.as_bytes(), self.bucket).cmp(&(account, resource, bucket))
    }

    /// Its fields, once its amount is known to fit an export's 64 bits.
    pub(crate) fn fields(&self) -> Result<crate::export::format::TotalFields<'_>, StreamError> {
        Ok(crate::export::format::TotalFields {
            account: self.account.as_bytes(),
            resource: self.resource.as_bytes(),
            bucket: self.bucket,
            amount: export_amount(self.amount, &self.account, &self.resource, self.bucket)?,
            entries: self.entries,
        })
    }
}

/// A total added in 128 bits as an export writes it: 64 bits of minor
/// units, or the overflow every read reports, naming the total.
pub(crate) fn export_amount(
    amount: i128,
    account: &str,
    resource: &str,
    bucket: NaiveDate,
) -> Result<i64, StreamError> {
    i64::try_from(amount).map_err(|_| StreamError::Store(total_past_64_bits(account, resource, bucket)))
}

/// The total of (`account`, `resource`, `bucket`) does not fit 64-bit minor
/// units: the overflow every read reports, naming the total.
pub(crate) fn total_past_64_bits(account: &str, resource: &str, bucket: NaiveDate) -> StoreError {
    StoreError::overflow(&format!(
        "the total of account '{account}', resource '{resource}', {bucket}"
    ))
}

/// A folded total plus the tail total of the same key; overflow is an error,
/// never a wrap.
pub(crate) fn add_tail<'a>(
    folded: crate::export::format::TotalFields<'a>,
    tail: &TailTotal,
) -> Result<crate::export::format::TotalFields<'a>, StreamError> {
    let entries = folded.entries.checked_add(tail.entries).ok_or_else(|| {
        StreamError::Data(format!(
            "the entry count of account '{}', resource '{}', {} exceeds 64 bits",
            tail.account, tail.resource, tail.bucket
        ))
    })?;
    Ok(crate::export::format::TotalFields {
        amount: export_amount(
            i128::from(folded.amount) + tail.amount,
            &tail.account,
            &tail.resource,
            tail.bucket,
        )?,
        entries,
        ..folded
    })
}

/// One (account, resource, bucket) total, in minor units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TotalRow {
    /// Account.
    pub account: String,
    /// Resource.
    pub resource: String,
    /// The bucket's first day.
    pub bucket: NaiveDate,
    /// Net amount, minor units.
    pub amount: i64,
    /// Entries counted.
    pub entries: i64,
}

/// The SQL of a statement for one granularity: fills in the table and the
/// bucket expressions of a template (the `export_totals*.sql` files; on
/// SQLite every statement that buckets entries).
pub(crate) fn totals_sql(template: &str, table: &str, bucket: &str, bucket_of_entry: &str) -> String {
    template
        .replace("{table}", table)
        .replace("{bucket_of_entry}", bucket_of_entry)
        .replace("{bucket}", bucket)
}

/// Decides a consume from the limits and the units used so far, both read
/// by [`Store::consume`] under its lock.
pub trait ConsumeDecider: Send + Sync {
    /// The periods `used` is read for (one or two, distinct), given the
    /// account's plan history (by `effective_at`, then creation) and override
    /// changes (in the order made).
    fn periods(&self, plans: &[PlanAssignment], overrides: &[OverrideChange]) -> Vec<Period>;

    /// `Ok(response)` records the entry and keeps the response for replays,
    /// `Err(reason)` refuses it; `used[i]` is for the `i`-th of
    /// [`ConsumeDecider::periods`].
    fn decide(&self, plans: &[PlanAssignment], overrides: &[OverrideChange], used: &[i64]) -> Result<String, String>;

    /// Counts the consume against its per-minute rate, once its row is
    /// written but not yet committed: `Err(reason)` rolls the row back. Only
    /// a consume that records is counted — not one that found its key taken
    /// meanwhile and answers as a replay or a conflict (review AM).
    fn charge_rate(&self, plans: &[PlanAssignment]) -> Result<(), String>;
}

/// What a consume did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumeResult {
    /// Appended; `response` is what `decide` answered.
    Recorded {
        /// The new entry.
        entry_id: i64,
        /// The response to send.
        response: String,
    },
    /// Refused; nothing written.
    Rejected {
        /// What `decide` gave as the reason.
        reason: String,
    },
    /// The key was used before with the same content: nothing new recorded.
    Replayed {
        /// The earlier entry.
        entry_id: i64,
        /// When the earlier entry occurred: a retry that left `occurred_at`
        /// out matches an entry of any instant, and is answered about its window.
        occurred_at: DateTime<Utc>,
        /// The earlier response, if that entry came from a consume.
        response: Option<String>,
    },
}

/// What [`Store::check_inputs`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckInputs {
    /// Plan assignments, by `effective_at` then creation.
    pub plans: Vec<PlanAssignment>,
    /// Every change to the account's overrides, in the order made.
    pub override_changes: Vec<OverrideChange>,
    /// Minor units used in the period asked about.
    pub used: i64,
}

/// The catalog's rule for one resource on one plan, in minor units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanRule {
    /// The plan.
    pub plan: String,
    /// None: unlimited.
    pub limit: Option<i64>,
    /// Hard or soft.
    pub enforcement: Enforcement,
    /// The counting window.
    pub window: Window,
    /// Price per unit over a soft limit, as exact decimal text.
    pub overage_price: Option<String>,
}

/// What the database needs to decide a consume on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumeRules {
    /// The plan of an account with no assignment in force.
    pub default_plan: String,
    /// The plans that list the resource (the others: unlimited, hard, month).
    pub plans: Vec<PlanRule>,
    /// The period the consume most likely counts in, for the settled-sum
    /// cache (a wrong guess costs a cold read, never a wrong answer).
    pub likely_period: Period,
}

/// What [`Store::consume_decided`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecidedConsume {
    /// Appended. `context` is the stored outcome: the resolved limit as JSON,
    /// with `used_after`.
    Recorded {
        /// The new entry.
        entry_id: i64,
        /// The stored outcome.
        context: String,
    },
    /// Over a hard limit (or past BIGINT); nothing written.
    Rejected {
        /// Units used when refused.
        used: i64,
        /// The resolved limit as JSON.
        context: String,
        /// The limit passed is the one in force now, not at the consume's
        /// `occurred_at` (a dated consume is held to both).
        in_force_now: bool,
    },
    /// The key was used before: as [`Store::consume`] answers it.
    Replayed(ConsumeResult),
}

/// What to do when a consume finds its key already stored.
pub(crate) fn replay(entry: &NewEntry, stored: &Entry, response: Option<String>) -> Result<ConsumeResult, StoreError> {
    if entry.same_content_as(stored) {
        Ok(ConsumeResult::Replayed {
            entry_id: stored.id,
            occurred_at: stored.occurred_at,
            response,
        })
    } else {
        Err(conflict(None, entry, stored.into(), &format!("entry {}", stored.id)))
    }
}

/// About how many ledger rows the rollup has not folded: the ids past the
/// cursor's (same statement on both engines). On SQLite, less any ids a
/// rolled-back insert burned; on PostgreSQL a row that commits late may also
/// sit below the cursor's id. Close enough to size a batch, never to bound it.
pub(crate) const UNFOLDED_ESTIMATE_SQL: &str = "SELECT (SELECT COALESCE(MAX(id), 0) FROM entries)
      - (SELECT last_id FROM rollup_cursor WHERE name = 'rollup')";

/// A hook run just before a rollup batch commits.
pub type BeforeCommit = dyn Fn() -> Result<(), StoreError> + Send + Sync;

/// A resource whose catalog digits differ from those its stored amounts
/// were written with ([`reconcile_digits`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigitsClash {
    /// The resource.
    pub resource: String,
    /// The digits its stored amounts were written with.
    pub stored: u32,
    /// The digits the catalog gives it.
    pub catalog: u32,
    /// Whether the database holds amounts of it (else only `serve` may
    /// record the new digits).
    pub holds_amounts: bool,
}

/// Compares the catalog's fractional digits with those recorded for each
/// resource (migration 0021), and records the catalog's where none are, or,
/// with `change_where_nothing_held` (`serve`), where the database holds no
/// amount of the resource. Returns the resources refused: recorded with
/// other digits while the database holds amounts of them, which this catalog
/// would read at another scale, or (without `change_where_nothing_held`)
/// while it holds none, which a server on the old catalog may write. A
/// record that cannot be written (a read-only role) is logged, not
/// returned: the comparison stands. The first look reads only, so on every
/// open but the first that is all.
pub async fn reconcile_digits(
    store: &dyn Store,
    catalog: &Catalog,
    change_where_nothing_held: bool,
) -> Result<Vec<DigitsClash>, StoreError> {
    let recorded: HashMap<String, i64> = store.recorded_digits().await?.into_iter().collect();
    let mut new = Vec::new();
    let mut changed = Vec::new();
    for (name, spec) in &catalog.resources {
        let resource = name.as_str();
        match recorded.get(resource) {
            Some(&stored) if stored == i64::from(spec.decimals) => {}
            Some(_) if change_where_nothing_held && !store.holds_amounts_of(resource).await? => {
                changed.push((resource.to_owned(), spec.decimals));
            }
            Some(_) => {}
            None => new.push((resource.to_owned(), spec.decimals)),
        }
    }
    if new.is_empty() && changed.is_empty() {
        return clashes(store, catalog, &recorded).await;
    }
    // The first to record a resource's digits wins (review AT: two first
    // opens with different digits both went on, each writing at its own
    // scale); a changed one replaces. Then judged on what is recorded.
    for (digits, replace) in [(&new, false), (&changed, true)] {
        if !digits.is_empty()
            && let Err(e) = store.record_digits(digits, replace).await
        {
            let names: Vec<&str> = digits.iter().map(|(r, _)| r.as_str()).collect();
            let why = crate::telemetry::cause_chain(&e);
            tracing::warn!(
                resources = %names.join(", "),
                error = %why,
                "cannot record the fractional digits of {}: {why}",
                names.join(", ")
            );
        }
    }
    let recorded: HashMap<String, i64> = store.recorded_digits().await?.into_iter().collect();
    clashes(store, catalog, &recorded).await
}

/// The catalog's resources whose digits differ from `recorded`
/// ([`reconcile_digits`]).
async fn clashes(
    store: &dyn Store,
    catalog: &Catalog,
    recorded: &HashMap<String, i64>,
) -> Result<Vec<DigitsClash>, StoreError> {
    let mut clashes = Vec::new();
    for (name, spec) in &catalog.resources {
        let resource = name.as_str();
        match recorded.get(resource) {
            Some(&stored) if stored != i64::from(spec.decimals) => clashes.push(DigitsClash {
                resource: resource.to_owned(),
                stored: u32::try_from(stored).unwrap_or(u32::MAX),
                catalog: spec.decimals,
                holds_amounts: store.holds_amounts_of(resource).await?,
            }),
            _ => {}
        }
    }
    Ok(clashes)
}

/// The `api_keys` columns every key query returns, in the order of each
/// engine's key row (the same on both engines).
pub(crate) const API_KEY_COLUMNS: &str = "id, name, role, account, prefix, created_at, revoked_at";

/// The conflict clause of [`Store::record_digits`]'s insert, the same on
/// both engines: the first record of a resource wins unless `replace`.
pub(crate) fn digits_on_conflict(replace: bool) -> &'static str {
    if replace {
        "ON CONFLICT (resource) DO UPDATE SET digits = excluded.digits, recorded_at = excluded.recorded_at"
    } else {
        "ON CONFLICT (resource) DO NOTHING"
    }
}

/// [`Store::holds_keys`]'s answer: a flag per pair of `len`, set at the
/// 0-based indexes the query found held.
pub(crate) fn flags_at(len: usize, held: Vec<i64>) -> Vec<bool> {
    let mut flags = vec![false; len];
    for index in held {
        flags[usize::try_from(index).expect("an index of the array")] = true;
    }
    flags
}

/// The ledger rows committed at one moment ([`Store::committed_so_far`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommittedMark {
    /// PostgreSQL: a snapshot (`pg_current_snapshot()` as text). Ids and
    /// transaction ids follow start order, not commit order, so only a
    /// snapshot tells which rows had committed.
    Snapshot(String),
    /// SQLite: the newest ledger id (one writer: ids follow commit order).
    LastId(i64),
}

/// A total that differs from what the ledger says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TotalMismatch {
    /// `daily` or `monthly`.
    pub table: &'static str,
    /// Account.
    pub account: String,
    /// Resource.
    pub resource: String,
    /// The bucket's first day.
    pub bucket: NaiveDate,
    /// (amount in minor units, entries) recomputed from the ledger; None if
    /// the ledger has none.
    pub expected: Option<(i128, i64)>,
    /// (amount in minor units, entries) stored; None if the row is missing.
    pub actual: Option<(i128, i64)>,
}

impl TotalMismatch {
    /// The granularity of the totals table it is in.
    pub fn granularity(&self) -> Granularity {
        if self.table == "monthly" {
            Granularity::Month
        } else {
            Granularity::Day
        }
    }

    /// Which total it is.
    pub fn name(&self) -> TotalName {
        TotalName {
            granularity: self.granularity(),
            account: self.account.clone(),
            resource: self.resource.clone(),
            bucket: self.bucket,
        }
    }
}

/// One daily or monthly total, by its key; displayed as an operator reads it
/// ("the daily total of acme / api_requests / 2026-04-01", a month as
/// `2026-04`, as the monthly export names it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TotalName {
    /// Daily or monthly.
    pub granularity: Granularity,
    /// Account.
    pub account: String,
    /// Resource.
    pub resource: String,
    /// The bucket's first day.
    pub bucket: NaiveDate,
}

impl std::fmt::Display for TotalName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (table, bucket) = match self.granularity {
            Granularity::Day => ("daily", self.bucket.to_string()),
            Granularity::Month => ("monthly", self.bucket.format("%Y-%m").to_string()),
        };
        write!(f, "{table} total of {} / {} / {bucket}", self.account, self.resource)
    }
}

/// Held while a job runs; releasing it (or dropping it, which closes its
/// connection) lets another process run the job.
pub struct JobLock {
    pg: Option<(sqlx::PgConnection, i64)>,
}

impl JobLock {
    /// A lock that needs no database state (SQLite).
    pub fn in_process() -> Self {
        Self { pg: None }
    }

    /// A PostgreSQL session advisory lock held on `conn`.
    pub(crate) fn postgres(conn: sqlx::PgConnection, key: i64) -> Self {
        Self { pg: Some((conn, key)) }
    }

    /// Releases the lock now.
    pub async fn release(self) {
        if let Some((mut conn, key)) = self.pg {
            let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
                .bind(key)
                .execute(&mut conn)
                .await;
            let _ = sqlx::Connection::close(conn).await;
        }
    }
}

/// One total as `verify` compares it: (account, resource, bucket, amount in
/// minor units, entries). 128 bits, so a total past 64 bits is compared too.
pub(crate) type VerifiedTotal = (String, String, NaiveDate, i128, i64);

/// Compares recomputed and stored totals, keyed by (account, resource, bucket).
/// Stored rows of one key are added: on SQLite a total past 64 bits is kept in
/// several parts (migration 0011).
pub(crate) fn diff_totals(
    table: &'static str,
    expected: Vec<VerifiedTotal>,
    actual: Vec<VerifiedTotal>,
) -> Vec<TotalMismatch> {
    let mut stored: HashMap<(String, String, NaiveDate), (i128, i64)> = HashMap::new();
    for (a, r, b, amount, n) in actual {
        let sum = stored.entry((a, r, b)).or_default();
        *sum = (sum.0 + amount, sum.1.saturating_add(n));
    }
    let mut mismatches = Vec::new();
    for (account, resource, bucket, amount, n) in expected {
        let actual = stored.remove(&(account.clone(), resource.clone(), bucket));
        if actual != Some((amount, n)) {
            mismatches.push(TotalMismatch {
                table,
                account,
                resource,
                bucket,
                expected: Some((amount, n)),
                actual,
            });
        }
    }
    // Stored rows the ledger does not explain (a zero total with no entries is
    // impossible: every folded row counts at least one entry).
    for ((account, resource, bucket), values) in stored {
        mismatches.push(TotalMismatch {
            table,
            account,
            resource,
            bucket,
            expected: None,
            actual: Some(values),
        });
    }
    mismatches.sort_by(|a, b| {
        (a.table, &a.account, &a.resource, a.bucket).cmp(&(b.table, &b.account, &b.resource, b.bucket))
    });
    mismatches
}

/// A key to store: its hash and what it may do.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    /// SHA-256 of the plaintext, hex.
    pub hash: String,
    /// First characters of the plaintext.
    pub prefix: String,
    /// What it may do.
    pub role: Role,
    /// The account it is bound to.
    pub account: Option<AccountId>,
    /// A name for people.
    pub name: Option<String>,
}

/// How long [`Store::close`] waits for each pool's connections in use to be
/// returned: a process on its way out does not hang on one.
pub(crate) const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// sqlx logs a statement slower than a second at this level, with its whole
/// text. Info, not sqlx's default warn: the rollup's and the exports' large
/// statements take seconds by design, and a warning with pages of SQL on
/// every large batch was noise. `RUST_LOG=sqlx=info` shows them.
const SLOW_STATEMENT_LEVEL: log::LevelFilter = log::LevelFilter::Info;

/// Runs `migrator` on `conn` and logs what it applied. The versions applied
/// before are read under the migrator's lock, held until the run is over
/// (PostgreSQL's advisory lock is re-entrant: the migrator takes it again),
/// so that of several processes starting at once only the one that applied
/// the migrations logs them. Reading `_sqlx_migrations` before sqlx creates
/// it put an ERROR ("relation does not exist") in PostgreSQL's log on every
/// first start. sqlx's SQLite lock does nothing: [`sqlite::SqliteStore`]
/// holds a lock of its own around this.
///
/// `table_exists` says whether `_sqlx_migrations` is there (the engine asks
/// its catalog, which logs no error when it is not). When it is and already
/// holds every migration, checksums included, nothing else is done: the lock
/// and sqlx's `CREATE TABLE IF NOT EXISTS` need write access, and a
/// read-only role (a reporting user with SELECT only, a database or replica
/// with `default_transaction_read_only = on`) could otherwise run no command
/// at all, not even an export.
async fn run_migrations<C: sqlx::migrate::Migrate>(
    migrator: &sqlx::migrate::Migrator,
    conn: &mut C,
    table_exists: bool,
) -> Result<(), OpenError> {
    if table_exists {
        let applied = conn.list_applied_migrations().await.map_err(OpenError::Migrations)?;
        refuse_versions_unknown_here(migrator, &applied)?;
        if conn.dirty_version().await.map_err(OpenError::Migrations)?.is_none() && all_applied(migrator, &applied) {
            return Ok(());
        }
    }
    conn.lock().await.map_err(OpenError::Migrations)?;
    let ran = async {
        conn.ensure_migrations_table().await?;
        let before: Vec<i64> = conn
            .list_applied_migrations()
            .await?
            .into_iter()
            .map(|m| m.version)
            .collect();
        // `run_direct` is `run` on a connection we hold (sqlx's way round
        // `Acquire` bounds that a generic connection cannot meet).
        migrator.run_direct(&mut *conn).await?;
        Ok::<_, sqlx::migrate::MigrateError>(before)
    }
    .await;
    let unlocked = conn.unlock().await;
    let before = match ran {
        // Applied by another process since the look above.
        Err(sqlx::migrate::MigrateError::VersionMissing(version)) => return Err(newer_tally(migrator, version)),
        ran => ran.map_err(OpenError::Migrations)?,
    };
    unlocked.map_err(OpenError::Migrations)?;
    log_applied_migrations(migrator, &before);
    Ok(())
}

/// Whether every migration of `migrator` is in `applied` with the same
/// checksum (what sqlx's own run would find nothing to do for).
fn all_applied(migrator: &sqlx::migrate::Migrator, applied: &[sqlx::migrate::AppliedMigration]) -> bool {
    migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .all(|m| {
            applied
                .iter()
                .any(|a| a.version == m.version && a.checksum == m.checksum)
        })
}

/// Refuses a database that holds a migration this binary does not know: a
/// newer Tally migrated it, and this one cannot know what that changed.
fn refuse_versions_unknown_here(
    migrator: &sqlx::migrate::Migrator,
    applied: &[sqlx::migrate::AppliedMigration],
) -> Result<(), OpenError> {
    if migrator.ignore_missing {
        return Ok(());
    }
    match applied.iter().find(|a| !migrator.version_exists(a.version)) {
        Some(unknown) => Err(newer_tally(migrator, unknown.version)),
        None => Ok(()),
    }
}

/// The error for a database that holds migration `version`, which
/// `migrator` (this binary's) lacks.
fn newer_tally(migrator: &sqlx::migrate::Migrator, version: i64) -> OpenError {
    let latest = migrator.iter().map(|m| m.version).max().unwrap_or(0);
    OpenError::NewerTally { version, latest }
}

/// Logs what a migration run changed, given the versions applied before it:
/// an upgrade says which migrations it applied (docs/operations.md has
/// notes for some), a new database that it got the schema.
fn log_applied_migrations(migrator: &sqlx::migrate::Migrator, before: &[i64]) {
    let applied: Vec<_> = migrator.iter().filter(|m| !before.contains(&m.version)).collect();
    let (Some(first), Some(last)) = (applied.first(), applied.last()) else {
        return;
    };
    if before.is_empty() {
        tracing::info!(
            migrations = applied.len(),
            "created the schema (migrations {:04} to {:04})",
            first.version,
            last.version
        );
        return;
    }
    for m in applied {
        tracing::info!(
            migration = m.version,
            "applied migration {:04} ({})",
            m.version,
            m.description
        );
    }
}

/// Whether a `sqlite:` URL names an in-memory database, however spelt: its
/// name is `:memory:` or `file::memory:…`, or a `mode=memory` parameter
/// (`sqlite::memory:`, `sqlite:file::memory:`, `sqlite:x?mode=memory`). Read
/// as sqlx reads the URL: a folder or file whose name merely contains
/// `:memory:` or `mode=memory` is a file.
pub fn sqlite_in_memory(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("sqlite:") else {
        return false;
    };
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let (name, parameters) = rest.split_once('?').unwrap_or((rest, ""));
    name == ":memory:" || name.starts_with("file::memory:") || parameters.split('&').any(|p| p == "mode=memory")
}

/// Whether SQLite refused to write (`SQLITE_READONLY` and its extended
/// codes, such as a folder it cannot create its `-wal` file in).
fn sqlite_read_only(error: &sqlx::Error) -> bool {
    const SQLITE_READONLY: i32 = 8;
    error
        .as_database_error()
        .and_then(|e| e.code())
        .and_then(|code| code.parse::<i32>().ok())
        .is_some_and(|code| code & 0xff == SQLITE_READONLY)
}

/// The file a `sqlite:` URL names; `None` for another engine or an
/// in-memory database; an error for a URL naming no file.
pub fn sqlite_file(url: &str) -> Result<Option<std::path::PathBuf>, OpenError> {
    if !url.starts_with("sqlite:") || sqlite_in_memory(url) {
        return Ok(None);
    }
    let options = <sqlx::sqlite::SqliteConnectOptions as std::str::FromStr>::from_str(url).map_err(|source| {
        OpenError::SqliteUrl {
            url: url.to_owned(),
            source,
        }
    })?;
    let file = sqlite_path(options.get_filename());
    if file.as_os_str().is_empty() {
        return Err(OpenError::SqliteNoFile(url.to_owned()));
    }
    Ok(Some(file))
}

/// The path of the file sqlx's SQLite `filename` opens: `sqlite:file:x.db`
/// names x.db, as SQLite's own URI filenames do.
pub(crate) fn sqlite_path(filename: &std::path::Path) -> std::path::PathBuf {
    filename
        .to_str()
        .and_then(|f| f.strip_prefix("file:"))
        .map_or(filename, std::path::Path::new)
        .to_path_buf()
}

/// A URL with its password hidden, for messages: in the user info
/// (`user:secret@`) and in a `password=` query parameter, which PostgreSQL
/// URLs take too.
///
/// The rule is safe by construction rather than by parsing, because the URL
/// a message shows may be the malformed one that failed (a password with an
/// unencoded `@`, `/`, `?`, `&` or `://`), and each parsing heuristic before
/// this one left some spelling showing part of a password (reviews AY, AZ,
/// BB, BC). Two kinds of span are found on the URL as given, and their union
/// is hidden: a password sits between the user info's first `:` and an `@`,
/// so everything from the first `:` after the scheme's `//` up to the *last*
/// `@` anywhere; and the value of every parameter whose key decodes, as
/// sqlx decodes it, to `password` in any case (`%70assword=` too), up to the
/// next `&`. When a query value holds an `@` this hides the host and path
/// too: more than needed, never less.
pub fn redact_url(url: &str) -> String {
    let mut hidden: Vec<std::ops::Range<usize>> = query_password_spans(url).collect();
    if let Some(last_at) = url.rfind('@') {
        // Only a real scheme's `//` starts the user info; without one
        // (`u:secret@host/db`, `postgres:/u:secret@…`) everything from the
        // first `:` is hidden, a `://` inside a password included.
        let from = scheme_with_slashes(url).filter(|&end| end < last_at).unwrap_or(0);
        if let Some(colon) = url[from..last_at].find(':') {
            hidden.push(from + colon + 1..last_at);
        }
    }
    hidden.sort_by_key(|span| span.start);
    let mut redacted = String::with_capacity(url.len());
    let mut shown_from = 0;
    for span in hidden {
        if span.start >= shown_from {
            redacted.push_str(&url[shown_from..span.start]);
            redacted.push_str("***");
        }
        shown_from = shown_from.max(span.end);
    }
    redacted.push_str(&url[shown_from..]);
    redacted
}

/// Where the user info can start: just past `scheme://` when `url` starts
/// with a valid scheme (RFC 3986: a letter, then letters, digits, `+`, `-`
/// or `.`) followed by `://`.
fn scheme_with_slashes(url: &str) -> Option<usize> {
    let colon = url.find(':')?;
    let scheme = &url[..colon];
    let valid = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    (valid && url[colon..].starts_with("://")).then_some(colon + 3)
}

/// The spans of `url` holding a password parameter's value: after every
/// `?` or `&`, a key that decodes to `password` (any case), from its `=` to
/// the next `&` or the end.
fn query_password_spans(url: &str) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    url.match_indices(['?', '&']).filter_map(|(mark, _)| {
        let key_at = mark + 1;
        let pair_end = url[key_at..].find('&').map_or(url.len(), |end| key_at + end);
        let equals = url[key_at..pair_end].find('=')? + key_at;
        let (key, _) = form_urlencoded::parse(&url.as_bytes()[key_at..equals]).next()?;
        key.eq_ignore_ascii_case("password").then_some(equals + 1..pair_end)
    })
}

/// Opens the store a database URL names (`sqlite://…` or `postgres://…`).
pub async fn connect(url: &str, catalog: Arc<Catalog>) -> Result<Arc<dyn Store>, OpenError> {
    if url.starts_with("sqlite:") {
        // Refuses a URL naming no file before SQLite opens temporary ones.
        sqlite_file(url)?;
        match sqlite::SqliteStore::connect(url, catalog).await {
            Ok(store) => Ok(Arc::new(store)),
            Err(source) if sqlite_read_only(&source) => match sqlite_file(url) {
                Ok(Some(file)) => Err(OpenError::SqliteNotWritable { file, source }),
                _ => Err(source.into()),
            },
            Err(e) => Err(e.into()),
        }
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(Arc::new(postgres::PgStore::connect(url, catalog).await?))
    } else {
        Err(OpenError::UnsupportedUrl(redact_url(url)))
    }
}

/// Turns the rows a batch insert created, plus the rows already stored under
/// the other keys, into per-entry outcomes in request order. Shared by both
/// engines so that "duplicate or conflict" is decided in one place.
pub(crate) fn resolve_outcomes(
    entries: &[NewEntry],
    created: &HashMap<(String, String), i64>,
    existing: &HashMap<(String, String), Entry>,
) -> Result<Vec<InsertOutcome>, StoreError> {
    let mut seen_created = std::collections::HashSet::new();
    entries
        .iter()
        .enumerate()
        .map(|(index, entry)| {
            let key = natural_key(&entry.account, &entry.idempotency_key);
            // The first occurrence of a key the insert created is "created";
            // a repeat of it inside the same batch is compared like any duplicate.
            if let Some(&id) = created.get(&key) {
                if seen_created.insert(key.clone()) {
                    return Ok(InsertOutcome {
                        id,
                        idempotency_key: entry.idempotency_key.clone(),
                        status: InsertStatus::Created,
                    });
                }
                let first = entries
                    .iter()
                    .find(|e| e.account == entry.account && e.idempotency_key == entry.idempotency_key)
                    .expect("the first occurrence is in the batch");
                return if same_new_content(first, entry) {
                    Ok(InsertOutcome {
                        id,
                        idempotency_key: entry.idempotency_key.clone(),
                        status: InsertStatus::Duplicate,
                    })
                } else {
                    Err(conflict(
                        Some(index),
                        entry,
                        first.into(),
                        "an earlier entry of this batch",
                    ))
                };
            }
            let stored = existing.get(&key).ok_or_else(|| StoreError::key_taken(Some(index)))?;
            if entry.same_content_as(stored) && entry.reverses == stored.reverses {
                Ok(InsertOutcome {
                    id: stored.id,
                    idempotency_key: entry.idempotency_key.clone(),
                    status: InsertStatus::Duplicate,
                })
            } else {
                Err(conflict(
                    Some(index),
                    entry,
                    stored.into(),
                    &format!("entry {}", stored.id),
                ))
            }
        })
        .collect()
}

/// Whether `repeat`, a later entry of the batch with `first`'s key, is a
/// retry of it, by the rule a retry in another request meets
/// ([`NewEntry::same_content_as`]): a repeat that leaves `occurred_at` out
/// matches any instant; one that names it must name the instant `first` is
/// recorded at (the request's time when `first` left it out).
fn same_new_content(first: &NewEntry, repeat: &NewEntry) -> bool {
    first.resource == repeat.resource
        && first.amount == repeat.amount
        && first.reverses == repeat.reverses
        && (!repeat.occurred_at_given || first.occurred_at == repeat.occurred_at)
}

/// What of an entry its idempotency key stands for, to compare a retry
/// with: `occurred_at` is None when the client left it out (it then matches
/// any instant).
pub(crate) struct KeyedContent<'a> {
    resource: &'a ResourceName,
    amount: Amount,
    occurred_at: Option<DateTime<Utc>>,
    reverses: Option<i64>,
}

impl<'a> From<&'a NewEntry> for KeyedContent<'a> {
    fn from(e: &'a NewEntry) -> Self {
        Self {
            resource: &e.resource,
            amount: e.amount,
            occurred_at: e.occurred_at_given.then_some(e.occurred_at),
            reverses: e.reverses,
        }
    }
}

impl<'a> From<&'a Entry> for KeyedContent<'a> {
    fn from(e: &'a Entry) -> Self {
        Self {
            resource: &e.resource,
            amount: e.amount,
            occurred_at: Some(e.occurred_at),
            reverses: e.reverses,
        }
    }
}

/// The fields in which `given` differs from what its key already holds,
/// each as "FIELD (STORED there, GIVEN here)".
fn differences(given: &KeyedContent<'_>, stored: &KeyedContent<'_>) -> Vec<String> {
    let mut out = Vec::new();
    let mut differ = |field: &str, there: String, here: String| {
        out.push(format!("{field} ({there} there, {here} here)"));
    };
    if given.resource != stored.resource {
        differ(
            "resource",
            format!("'{}'", stored.resource),
            format!("'{}'", given.resource),
        );
    }
    if given.amount != stored.amount {
        differ("amount", stored.amount.to_string(), given.amount.to_string());
    }
    if let (Some(here), Some(there)) = (given.occurred_at, stored.occurred_at)
        && here != there
    {
        let shown = |t: DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        differ("occurred_at", shown(there), shown(here));
    }
    if given.reverses != stored.reverses {
        let shown = |r: Option<i64>| r.map_or_else(|| "none".to_owned(), |id| format!("entry {id}"));
        differ("reverses", shown(stored.reverses), shown(given.reverses));
    }
    out
}

fn conflict(index: Option<usize>, entry: &NewEntry, stored: KeyedContent<'_>, other: &str) -> StoreError {
    let differs = differences(&KeyedContent::from(entry), &stored);
    let differs = match differs.is_empty() {
        true => "differs".to_owned(),
        false => format!("differs in {}", differs.join(" and ")),
    };
    StoreError::IdempotencyConflict {
        index,
        message: format!(
            "idempotency_key '{}' of account '{}' was already used by {other}, which {differs}; the same key must \
             carry the same usage, so use a new key for new usage (a retry resends the first content)",
            entry.idempotency_key, entry.account,
        ),
    }
}

/// Of `too_late` (problems naming entries of `entries` by index), those
/// whose key the ledger does not hold. A retry of an entry recorded while it
/// was within the late-arrival horizon is answered as any retry (duplicate,
/// or conflict); only a new one is too late. Keys never leave the ledger, so
/// what this finds stays true.
pub async fn too_late_unless_recorded(
    store: &dyn Store,
    entries: &[NewEntry],
    too_late: Vec<crate::domain::entry::FieldError>,
) -> Result<Vec<crate::domain::entry::FieldError>, StoreError> {
    if too_late.is_empty() {
        return Ok(too_late);
    }
    let keys: Vec<_> = too_late
        .iter()
        .map(|late| (&entries[late.index].account, &entries[late.index].idempotency_key))
        .collect();
    let held = store.holds_keys(&keys).await?;
    Ok(too_late
        .into_iter()
        .zip(held)
        .filter_map(|(late, held)| (!held).then_some(late))
        .collect())
}

/// Builds the reversal of `original`: the opposite amount, in the same bucket.
pub fn reversal_of(original: &Entry, key: IdempotencyKey, reason: Option<&str>) -> Result<NewEntry, StoreError> {
    if let Some(reversed) = original.reverses {
        return Err(StoreError::Invalid(format!(
            "entry {} is itself the reversal of entry {reversed}; post a new entry instead of reversing a reversal",
            original.id
        )));
    }
    Ok(NewEntry {
        account: original.account.clone(),
        resource: original.resource.clone(),
        amount: original.amount.checked_neg().ok_or_else(|| {
            StoreError::Invalid(format!(
                "entry {} holds {} minor units, which have no opposite in 64 bits; it was not posted through Tally, so correct it with a new entry instead",
                original.id,
                original.amount.minor()
            ))
        })?,
        idempotency_key: key,
        // Same occurred_at: the correction lands in the buckets the original counted in.
        occurred_at: original.occurred_at,
        occurred_at_given: true,
        source: Some("reversal".into()),
        metadata: reason.map(|r| serde_json::json!({ "reason": r }).to_string()),
        reverses: Some(original.id),
    })
}

/// Identifies a row by (account, idempotency key), the ledger's natural key.
pub(crate) fn natural_key(account: &AccountId, idempotency_key: &IdempotencyKey) -> (String, String) {
    (account.to_string(), idempotency_key.to_string())
}

/// The reversal constraint's name in both engines' migrations.
pub(crate) const REVERSES_INDEX: &str = "entries_reverses";

pub(crate) fn map_reversal_violation(e: sqlx::Error, entries: &[NewEntry]) -> StoreError {
    if let sqlx::Error::Database(db) = &e {
        let mentions_reverses = db.constraint() == Some(REVERSES_INDEX) || db.message().contains("entries.reverses");
        // SQLite answers from a trigger (migration 0010) before its unique
        // index is reached: a constraint error, not a unique violation.
        let from_trigger = db.kind() == sqlx::error::ErrorKind::Other && db.code().as_deref() == Some("1811");
        if (db.is_unique_violation() || from_trigger) && mentions_reverses {
            let id = entries.iter().find_map(|e| e.reverses).unwrap_or_default();
            return StoreError::AlreadyReversed(id);
        }
    }
    e.into()
}

#[cfg(test)]
mod tests {
    use chrono::NaiveDate;

    use super::redact_url;

    #[test]
    fn a_password_is_hidden_in_the_user_info_and_in_the_query() {
        assert_eq!(
            redact_url("postgres://tally:s3cret@db/tally?sslmode=require"),
            "postgres://tally:***@db/tally?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://tally@db/tally?sslmode=require&password=s3cret"),
            "postgres://tally@db/tally?sslmode=require&password=***"
        );
        assert_eq!(redact_url("sqlite://tally.db"), "sqlite://tally.db");
    }

    #[test]
    fn a_password_holding_an_at_sign_is_hidden_whole() {
        assert_eq!(
            redact_url("postgres://tally:s3c@r@t@db/tally?sslmode=require"),
            "postgres://tally:***@db/tally?sslmode=require"
        );
        assert_eq!(
            redact_url("postgres://tally:s3c/r?t@db/tally"),
            "postgres://tally:***@db/tally"
        );
        // An `@` in a query value hides the host and path too: more than
        // needed, never less.
        assert_eq!(
            redact_url("postgres://tally:s3cret@db/tally?application_name=a@b"),
            "postgres://tally:***@b"
        );
    }

    /// Review BB: an `@` in the query made the port's `:` look like the
    /// password's, and the query pass then missed `password=`; an unencoded
    /// `?` and `/` in a password showed the rest of it.
    #[test]
    fn a_password_stays_hidden_when_the_query_holds_an_at_sign() {
        assert_eq!(
            redact_url("postgres://db.example:5432/tally?application_name=ops@x&password=s3cret"),
            "postgres://db.example:***@x&password=***"
        );
        assert_eq!(redact_url("postgres://u:a@b?c/d@host/db"), "postgres://u:***@host/db");
        assert_eq!(
            redact_url("postgres://h/db?PassWord=a@b&sslmode=require&password=c"),
            "postgres://h/db?PassWord=***&sslmode=require&password=***"
        );
        assert_eq!(
            redact_url("postgres://h/db?xpassword=shown"),
            "postgres://h/db?xpassword=shown"
        );
        assert_eq!(
            redact_url("postgres://u:p@[::1]:5432/db"),
            "postgres://u:***@[::1]:5432/db"
        );
    }

    /// Review BC: a percent-encoded key is the password to sqlx; a `://` in
    /// a password without a scheme's `//`; `password=` inside a user-info
    /// password swallowed the `@` when the query pass ran first.
    #[test]
    fn a_password_stays_hidden_however_its_key_or_its_text_is_spelled() {
        assert_eq!(
            redact_url("postgres://u@h/db?%70assword=SECRET"),
            "postgres://u@h/db?%70assword=***"
        );
        assert_eq!(
            redact_url("postgres://u@h/db?passw%6Frd=SECRET&x=1"),
            "postgres://u@h/db?passw%6Frd=***&x=1"
        );
        assert_eq!(redact_url("u:SEC://RET@h/db"), "u:***@h/db");
        assert_eq!(redact_url("postgres:/u:SEC://RET@h/db"), "postgres:***@h/db");
        assert_eq!(redact_url("postgres:u:SEC://RET@h"), "postgres:***@h");
        assert_eq!(redact_url("postgres://u:pw&password=x@h/db"), "postgres://u:***");
        assert_eq!(redact_url("postgres://u:SEC?password=x@h/db"), "postgres://u:***");
        assert_eq!(redact_url("postgres://h:1/db?password=p@x"), "postgres://h:***");
    }

    /// Review AY: forms the first rule missed, each shown whole.
    #[test]
    fn a_password_is_hidden_in_a_url_without_two_slashes_or_holding_at_and_slash() {
        assert_eq!(redact_url("u:s3cret@h/db"), "u:***@h/db");
        assert_eq!(redact_url("postgres:/u:s3cret@h/db"), "postgres:***@h/db");
        assert_eq!(redact_url("mysql://u:s3@cr/et@h/db"), "mysql://u:***@h/db");
        assert_eq!(
            redact_url("postgres://u:a@b?c@127.0.0.1:1/db"),
            "postgres://u:***@127.0.0.1:1/db"
        );
        assert_eq!(redact_url("postgres://u:a@b#c@h/db"), "postgres://u:***@h/db");
    }

    use super::{AscendingKeys, sqlite_in_memory};

    #[test]
    fn only_sqlites_own_in_memory_forms_are_in_memory() {
        for url in [
            "sqlite::memory:",
            "sqlite://:memory:",
            "sqlite:file::memory:",
            "sqlite:file::memory:?cache=shared",
            "sqlite:?mode=memory",
            "sqlite:file:x?cache=shared&mode=memory",
        ] {
            assert!(sqlite_in_memory(url), "{url}");
        }
        for url in [
            "sqlite://tally.db",
            "sqlite:///tmp/part=mode=memory/t.db",
            "sqlite://mode=memory.db",
            "sqlite://x:memory:y.db",
            "sqlite:x.db?mode=rwc",
            "postgres://localhost/db?mode=memory",
        ] {
            assert!(!sqlite_in_memory(url), "{url}");
        }
    }

    fn day(d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(2026, 5, d).unwrap()
    }

    #[test]
    fn totals_in_byte_order_pass_and_a_key_going_back_is_an_error() {
        let mut order = AscendingKeys::default();
        order.advance(b"Zed", b"api_requests", day(1)).unwrap();
        order.advance(b"Zed", b"api_requests", day(2)).unwrap();
        order.advance(b"Zed", b"llm_tokens", day(1)).unwrap();
        // Byte order puts "a" after "Z"; a case-folding collation would not.
        order.advance(b"acme", b"api_requests", day(1)).unwrap();
        assert!(order.advance(b"Zoe", b"api_requests", day(1)).is_err());
        assert!(
            order.advance(b"acme", b"api_requests", day(1)).is_err(),
            "a repeated key"
        );
    }
}
