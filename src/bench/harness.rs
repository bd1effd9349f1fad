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
use crate::domain::KeySecret;
use crate::testing::pg_cluster::PgCluster;

/// Tally serving HTTP on `127.0.0.1` (a free port) from this process.
pub struct RunningTally {
    port: u16,
    admin_key: String,
    shutdown: Option<oneshot::Sender<()>>,
    server: JoinHandle<anyhow::Result<()>>,
}

impl RunningTally {
    /// Opens `database_url`, runs migrations, and serves on a free port with a
    /// fresh random admin key (as `TALLY_ADMIN_KEY` would set).
    ///
    /// # Errors
    ///
    /// Fails if the database cannot be opened or migrated, or binding fails.
    pub async fn start(database_url: &str) -> anyhow::Result<Self> {
        let admin_key = KeySecret::generate().expose().to_owned();
        let settings = Settings {
            database_url: database_url.to_owned(),
            listen: "127.0.0.1:0".parse()?,
            admin_key: Some(admin_key.clone()),
            ..Settings::default()
        };
        let app = Application::build(&settings).await.context("starting Tally")?;
        let port = app.port();
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async move {
            let _ = rx.await;
        }));
        Ok(Self {
            port,
            admin_key,
            shutdown: Some(tx),
            server,
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
pub const PG_CLUSTER_SETTINGS: &str = "fsync=off synchronous_commit=off full_page_writes=off shared_buffers=128MB";

/// Tally's SQLite pragmas, for reports.
pub const SQLITE_SETTINGS: &str = "journal_mode=WAL synchronous=FULL";

impl PgScratch {
    /// Runs `initdb` and starts the server (on a blocking thread).
    ///
    /// # Errors
    ///
    /// See [`PgCluster::start`].
    pub async fn start() -> anyhow::Result<Self> {
        let cluster = tokio::task::spawn_blocking(PgCluster::start)
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
