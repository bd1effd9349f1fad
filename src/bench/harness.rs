//! What every benchmark needs around the measurement: Tally running
//! in-process on a throwaway database, and direct access to that database.

use std::path::PathBuf;
use std::str::FromStr as _;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use sqlx::Connection as _;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqliteSynchronous};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::app::{Application, Settings};
use crate::bench::workload::SqlLedger;
use crate::domain::KeySecret;
use crate::testing::pg_cluster::{Durability, PgCluster};

/// Tally serving HTTP on `127.0.0.1` (a free port) from this process.
pub struct RunningTally {
    port: u16,
    admin_key: String,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<anyhow::Result<()>>,
    scheduler: Option<crate::jobs::Scheduler>,
}

impl RunningTally {
    /// Opens `database_url`, runs migrations, and serves on a free port with a
    /// fresh random admin key (as `TALLY_ADMIN_KEY` would set).
    ///
    /// # Errors
    ///
    /// Fails if the database cannot be opened or migrated, or binding fails.
    pub async fn start(database_url: &str) -> anyhow::Result<Self> {
        Self::start_inner(database_url, false).await
    }

    /// Like [`RunningTally::start`], but also fires the built-in scheduled
    /// jobs (the rollup every 10 s) as `tally serve` does; [`RunningTally::stop`]
    /// shuts the scheduler down and waits for the run in flight.
    ///
    /// # Errors
    ///
    /// As [`RunningTally::start`], or if the scheduler cannot start.
    pub async fn start_with_jobs(database_url: &str) -> anyhow::Result<Self> {
        Self::start_inner(database_url, true).await
    }

    async fn start_inner(database_url: &str, jobs: bool) -> anyhow::Result<Self> {
        let admin_key = KeySecret::generate().expose().to_owned();
        let settings = Settings {
            database_url: database_url.to_owned(),
            listen: "127.0.0.1:0".parse()?,
            admin_key: Some(admin_key.clone()),
            ..Settings::default()
        };
        let app = Application::build(&settings).await.context("starting Tally")?;
        let port = app.port();
        let scheduler = if jobs {
            let runner = app.job_runner(crate::jobs::builtin());
            Some(crate::jobs::Scheduler::start(runner).await?)
        } else {
            None
        };
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async move {
            let _ = rx.await;
        }));
        Ok(Self {
            port,
            admin_key,
            shutdown: Some(tx),
            server,
            scheduler,
        })
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The admin key the server accepts.
    pub fn admin_key(&self) -> &str {
        &self.admin_key
    }

    /// Stops the server and waits for it (at most 30 s).
    ///
    /// # Errors
    ///
    /// Fails if the server task failed or did not stop in time.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(scheduler) = self.scheduler.take() {
            // As `serve` with its default grace.
            let grace = std::time::Duration::from_secs(crate::app::DEFAULT_SHUTDOWN_GRACE_SECONDS);
            scheduler.shutdown(tokio::time::Instant::now() + grace).await;
        }
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match tokio::time::timeout(Duration::from_secs(30), &mut self.server).await {
            Ok(joined) => joined.context("the Tally server task panicked")?,
            Err(_) => {
                self.server.abort();
                bail!("the Tally server did not stop within 30 s")
            }
        }
    }
}

/// A temporary directory holding SQLite database files; deleted on drop.
pub struct SqliteScratch {
    dir: tempfile::TempDir,
}

impl SqliteScratch {
    /// Creates the directory (under `$TMPDIR`).
    ///
    /// # Errors
    ///
    /// Fails if the directory cannot be created.
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tally-bench-")
            .tempdir()
            .context("creating a temporary directory")?;
        Ok(Self { dir })
    }

    /// Path of file `name` in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `sqlite://DIR/{name}`.
    pub fn url(&self, name: &str) -> String {
        format!("sqlite://{}", self.path(name).display())
    }

    /// One connection to `{name}` with Tally's pragmas (WAL, synchronous=FULL,
    /// 10 s busy timeout), creating the file if missing.
    ///
    /// # Errors
    ///
    /// Fails if the file cannot be opened.
    pub async fn connect(&self, name: &str) -> anyhow::Result<SqliteConnection> {
        let options = SqliteConnectOptions::from_str(&self.url(name))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10));
        SqliteConnection::connect_with(&options)
            .await
            .with_context(|| format!("opening {}", self.path(name).display()))
    }
}

/// A throwaway PostgreSQL cluster (see [`PgCluster`]): tuned for speed with
/// `fsync = off`, `synchronous_commit = off` and `full_page_writes = off`.
pub struct PgScratch {
    cluster: PgCluster,
}

/// How the throwaway PostgreSQL cluster is tuned, for reports.
pub const PG_CLUSTER_SETTINGS: &str = Durability::Fast.settings();

/// Tally's SQLite pragmas, for reports.
pub const SQLITE_SETTINGS: &str = "journal_mode=WAL synchronous=FULL";

impl PgScratch {
    /// Runs `initdb` and starts the server (on a blocking thread).
    ///
    /// # Errors
    ///
    /// See [`PgCluster::start`].
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Durability::Fast).await
    }

    /// [`PgScratch::start`] with the given durability.
    ///
    /// # Errors
    ///
    /// See [`PgCluster::start`].
    pub async fn start_with(durability: Durability) -> anyhow::Result<Self> {
        let cluster = tokio::task::spawn_blocking(move || PgCluster::start_with(durability))
            .await
            .context("the PostgreSQL start-up task panicked")??;
        Ok(Self { cluster })
    }

    /// The cluster.
    pub fn cluster(&self) -> &PgCluster {
        &self.cluster
    }

    /// A new, empty database; returns its sqlx URL.
    ///
    /// # Errors
    ///
    /// See [`PgCluster::create_database`].
    pub async fn create_database(&self) -> anyhow::Result<String> {
        self.cluster.create_database().await
    }

    /// Runs `CHECKPOINT`, so that one phase's dirty pages are not written
    /// during the next phase's measurement.
    ///
    /// # Errors
    ///
    /// Fails if the maintenance database cannot be reached.
    pub async fn checkpoint(&self) -> anyhow::Result<()> {
        let mut conn = sqlx::PgConnection::connect(&self.cluster.admin_url()).await?;
        sqlx::raw_sql("CHECKPOINT").execute(&mut conn).await?;
        conn.close().await.ok();
        Ok(())
    }

    /// A copy of the database at `url` (`CREATE DATABASE … TEMPLATE …`), with
    /// every row and index; returns the copy's sqlx URL. Sessions connected to
    /// the original are terminated first (a template must have none); a pool
    /// that held them reconnects on its next use.
    ///
    /// # Errors
    ///
    /// Fails if the maintenance database cannot be reached or the copy fails.
    pub async fn clone_database(&self, url: &str) -> anyhow::Result<String> {
        let original = pg_database_name(url)?.to_owned();
        let copy = format!("{original}_copy");
        let mut conn = sqlx::PgConnection::connect(&self.cluster.admin_url()).await?;
        let mut attempts = 0;
        loop {
            sqlx::query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            )
            .bind(&original)
            .execute(&mut conn)
            .await?;
            match sqlx::raw_sql(&format!("CREATE DATABASE \"{copy}\" TEMPLATE \"{original}\""))
                .execute(&mut conn)
                .await
            {
                Ok(_) => break,
                Err(e) if attempts < 20 => {
                    attempts += 1;
                    tracing::debug!("CREATE DATABASE … TEMPLATE failed, retrying: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(e) => return Err(e).context("copying a database"),
            }
        }
        conn.close().await.ok();
        Ok(url.replacen(&format!("/{original}"), &format!("/{copy}"), 1))
    }

    /// The `psql` to use: the cluster's own, else the one on `PATH`.
    pub fn psql(&self) -> PathBuf {
        let own = self.cluster.bin_dir().join("psql");
        if own.is_file() { own } else { PathBuf::from("psql") }
    }
}

/// The database name in a `postgres://user@host/DB?…` URL.
///
/// # Errors
///
/// Fails if the URL has no database part.
pub fn pg_database_name(url: &str) -> anyhow::Result<&str> {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (_, path) = after_scheme
        .split_once('/')
        .ok_or_else(|| anyhow!("no database name in {url}"))?;
    let name = path.split_once('?').map_or(path, |(name, _)| name);
    if name.is_empty() {
        bail!("no database name in {url}");
    }
    Ok(name)
}

/// `SELECT COUNT(*) FROM {table}` on the database at `url` (SQLite or
/// PostgreSQL), through a fresh connection.
///
/// # Errors
///
/// Fails if the database cannot be reached or the table does not exist.
pub async fn count_rows(url: &str, table: &str) -> anyhow::Result<u64> {
    let sql = format!("SELECT COUNT(*) FROM {table}");
    let count: i64 = if url.starts_with("sqlite:") {
        let mut conn = SqliteConnection::connect(url).await?;
        let count = sqlx::query_scalar(&sql).fetch_one(&mut conn).await?;
        conn.close().await.ok();
        count
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        let count = sqlx::query_scalar(&sql).fetch_one(&mut conn).await?;
        conn.close().await.ok();
        count
    };
    u64::try_from(count).context("negative row count")
}

/// Inserts `ledger`'s rows into `entries` of the migrated database at `url`
/// with one statement, in one transaction, and returns how long it took.
///
/// With `rebuild_indexes`, the secondary indexes of `entries` (and on SQLite
/// its replace-guard triggers) are dropped first and re-created afterwards
/// from their own definitions (read from `sqlite_master` / `pg_indexes`),
/// which is much faster than maintaining them row by row; the result is the
/// same schema. PostgreSQL then gets
/// `VACUUM ANALYZE entries`, as autovacuum would eventually do.
///
/// # Errors
///
/// Fails if the database cannot be reached or a statement fails.
pub async fn fill_ledger(url: &str, ledger: &SqlLedger, rebuild_indexes: bool) -> anyhow::Result<Duration> {
    fill_ledger_with_metadata(url, ledger, 0, rebuild_indexes).await
}

/// [`fill_ledger`], with `metadata` on every `metadata_every`-th row (none
/// when 0; see [`SqlLedger::sqlite_insert_with_metadata`]).
///
/// # Errors
///
/// As [`fill_ledger`].
pub async fn fill_ledger_with_metadata(
    url: &str,
    ledger: &SqlLedger,
    metadata_every: u64,
    rebuild_indexes: bool,
) -> anyhow::Result<Duration> {
    let start = std::time::Instant::now();
    if url.starts_with("sqlite:") {
        let options = SqliteConnectOptions::from_str(url)?
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(60))
            .pragma("cache_size", "-1000000");
        let mut conn = SqliteConnection::connect_with(&options).await?;
        // With the indexes, the triggers that guard against a replacing
        // insert go too (migration 0010): each probes the ledger by key, a
        // full scan per row without its index.
        let indexes: Vec<(String, String, String)> = if rebuild_indexes {
            sqlx::query_as(
                "SELECT type, name, sql FROM sqlite_master \
                 WHERE type IN ('index', 'trigger') AND tbl_name = 'entries' AND sql IS NOT NULL \
                   AND (type = 'index' OR name LIKE 'entries_refuse_replace%')",
            )
            .fetch_all(&mut conn)
            .await?
        } else {
            Vec::new()
        };
        let mut tx = conn.begin().await?;
        for (kind, name, _) in &indexes {
            sqlx::raw_sql(&format!("DROP {} \"{name}\"", kind.to_uppercase()))
                .execute(&mut *tx)
                .await?;
        }
        sqlx::raw_sql(&ledger.sqlite_insert_with_metadata(metadata_every))
            .execute(&mut *tx)
            .await
            .context("generating ledger rows (SQLite)")?;
        for (_, _, sql) in &indexes {
            sqlx::raw_sql(sql).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        sqlx::raw_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut conn)
            .await?;
        conn.close().await.ok();
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        sqlx::raw_sql("SET maintenance_work_mem = '1GB'")
            .execute(&mut conn)
            .await?;
        let indexes: Vec<(String, String)> = if rebuild_indexes {
            sqlx::query_as(
                "SELECT i.indexname::text, i.indexdef FROM pg_indexes AS i \
                 WHERE i.schemaname = current_schema() AND i.tablename = 'entries' \
                 AND NOT EXISTS (SELECT 1 FROM pg_constraint AS c WHERE c.conname = i.indexname)",
            )
            .fetch_all(&mut conn)
            .await?
        } else {
            Vec::new()
        };
        let mut tx = conn.begin().await?;
        for (name, _) in &indexes {
            sqlx::raw_sql(&format!("DROP INDEX \"{name}\""))
                .execute(&mut *tx)
                .await?;
        }
        sqlx::raw_sql(&ledger.postgres_insert_with_metadata(metadata_every))
            .execute(&mut *tx)
            .await
            .context("generating ledger rows (PostgreSQL)")?;
        for (_, sql) in &indexes {
            sqlx::raw_sql(sql).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        sqlx::raw_sql("VACUUM ANALYZE entries").execute(&mut conn).await?;
        conn.close().await.ok();
    }
    Ok(start.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_name_is_found_in_cluster_urls() {
        let url = "postgres://tally@localhost/tally_1_2_ab?host=/tmp/tally-pg-x&port=5432";
        assert_eq!(pg_database_name(url).expect("has a name"), "tally_1_2_ab");
        assert_eq!(pg_database_name("postgres://h/db").expect("has a name"), "db");
        assert!(pg_database_name("postgres://h/?x=1").is_err());
    }
}
