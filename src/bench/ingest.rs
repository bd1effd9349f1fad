//! `tally-bench ingest`: bulk ingestion over HTTP against the database alone.
//!
//! For each engine:
//!
//! 1. **Tally**: start Tally in-process on an empty database, then post the
//!    rows ([`crate::bench::workload`]) as `POST /v1/entries` batches over
//!    `--connections` concurrent HTTP/1.1 connections. Request bodies are
//!    encoded before the clock starts; every response must be 200 with
//!    `created` equal to the batch size, and afterwards `SELECT COUNT(*) FROM
//!    entries` must equal the number of rows posted.
//! 2. **Baseline**: the same rows into a plain table with a primary key and
//!    `UNIQUE (account, idempotency_key)`, by the fastest ordinary means:
//!    - PostgreSQL: `psql \copy … FROM 'rows.csv' WITH (FORMAT csv)` (the CSV
//!      file is written before the clock starts);
//!    - SQLite: one transaction, one prepared `INSERT` executed per row, on a
//!      separate file with Tally's pragmas (WAL, `synchronous = FULL`).
//!
//! It prints entries/s for both and their ratio, then one summary line per
//! engine with the targets (≥ 100 000 entries/s on each engine; ≥ 1.0 × the
//! PostgreSQL baseline). Both PostgreSQL measurements run on the same
//! throwaway cluster, which is tuned for speed (`fsync = off`,
//! `synchronous_commit = off`), so their ratio is fair but neither absolute
//! figure is durable-write throughput.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use serde::Deserialize;
use tokio::task::JoinSet;

use super::harness::{
    PG_CLUSTER_SETTINGS, PgScratch, RunningTally, SQLITE_SETTINGS, SqliteScratch, count_rows, pg_database_name,
};
use super::workload::{Row, Workload, batch_body, rfc3339};
use super::{Engine, EngineChoice, rate};

/// Target throughput of Tally on each engine, entries per second.
pub const TARGET_ENTRIES_PER_SEC: u64 = 100_000;

/// Options of `tally-bench ingest`.
#[derive(Debug, Clone, Args)]
pub struct IngestArgs {
    /// Entries to post (each engine gets the same rows).
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub entries: u64,
    /// Entries per request (the API accepts up to 10 000).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub batch: u64,
    /// Concurrent HTTP connections, each posting one batch at a time.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=256))]
    pub connections: u64,
    /// Distinct accounts the entries spread over.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub accounts: u64,
    /// Which engines to measure.
    #[arg(long, value_enum, default_value_t = EngineChoice::Both)]
    pub engine: EngineChoice,
    /// Exit with status 1 when a target is missed.
    #[arg(long)]
    pub check: bool,
}

/// One engine's measurements.
#[derive(Debug, Clone)]
pub struct EngineReport {
    /// The engine.
    pub engine: Engine,
    /// Rows written by Tally and by the baseline each.
    pub entries: u64,
    /// Wall time of posting every batch to Tally.
    pub tally_elapsed: Duration,
    /// Wall time of the baseline load.
    pub baseline_elapsed: Duration,
    /// Wall time of a reference load that is not a target, if any (SQLite:
    /// [`SQLITE_ROWS_PER_STATEMENT`] rows per execution of one prepared
    /// statement, to show how much of the baseline is per-statement driver
    /// overhead).
    pub reference_elapsed: Option<Duration>,
}

impl EngineReport {
    /// Tally's entries per second.
    pub fn tally_rows_per_sec(&self) -> f64 {
        rate(self.entries, self.tally_elapsed)
    }

    /// The baseline's rows per second.
    pub fn baseline_rows_per_sec(&self) -> f64 {
        rate(self.entries, self.baseline_elapsed)
    }

    /// Tally's rate over the baseline's.
    pub fn ratio(&self) -> f64 {
        ratio_of(self.tally_rows_per_sec(), self.baseline_rows_per_sec())
    }

    /// The reference load's rows per second, if one ran.
    pub fn reference_rows_per_sec(&self) -> Option<f64> {
        self.reference_elapsed.map(|elapsed| rate(self.entries, elapsed))
    }

    /// How the baseline was loaded, for the report.
    pub fn baseline_method(&self) -> &'static str {
        match self.engine {
            Engine::Sqlite => "one transaction, one prepared statement",
            Engine::Postgres => "psql \\copy, CSV",
        }
    }

    /// The database settings both measurements ran under.
    pub fn settings(&self) -> String {
        match self.engine {
            Engine::Sqlite => format!("{SQLITE_SETTINGS} (Tally and baseline alike)"),
            Engine::Postgres => format!("throwaway cluster, {PG_CLUSTER_SETTINGS} (Tally and baseline alike)"),
        }
    }
}

/// `numerator_rate / denominator_rate`, 0 when the denominator is 0.
fn ratio_of(numerator_rate: f64, denominator_rate: f64) -> f64 {
    if denominator_rate > 0.0 {
        numerator_rate / denominator_rate
    } else {
        0.0
    }
}

/// A request body ready to send, and how many entries it holds.
#[derive(Clone)]
struct Batch {
    body: Vec<u8>,
    entries: usize,
}

/// The part of the `POST /v1/entries` response the benchmark checks.
#[derive(Deserialize)]
struct PostResponse {
    created: usize,
}

/// Runs `tally-bench ingest`.
///
/// # Errors
///
/// Fails when a database or Tally cannot be started, a request is answered
/// with anything but 200 and every entry created, the row count afterwards is
/// off, or a baseline fails.
pub async fn run(args: &IngestArgs) -> anyhow::Result<ExitCode> {
    let workload = Workload::recent(args.accounts);
    eprintln!("generating {} rows over {} accounts…", args.entries, args.accounts);
    let rows = workload.rows(args.entries);
    let batch_size = usize::try_from(args.batch).context("--batch too large")?;
    let batches = rows
        .chunks(batch_size)
        .map(|chunk| {
            Ok(Batch {
                body: batch_body(chunk)?,
                entries: chunk.len(),
            })
        })
        .collect::<serde_json::Result<Vec<Batch>>>()?;
    let body_bytes: usize = batches.iter().map(|b| b.body.len()).sum();
    eprintln!(
        "encoded {} request bodies ({} MiB)",
        batches.len(),
        body_bytes / (1024 * 1024)
    );

    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mut reports = Vec::new();
    for engine in args.engine.engines() {
        let report = match engine {
            Engine::Sqlite => run_sqlite(args, &rows, batches.clone()).await,
            Engine::Postgres => run_postgres(args, &rows, batches.clone()).await,
        }
        .with_context(|| format!("ingest benchmark on {engine}"))?;
        print_report(args, cores, &report);
        reports.push(report);
    }

    let pg_baseline_rows_per_sec = reports
        .iter()
        .find(|r| r.engine == Engine::Postgres)
        .map(EngineReport::baseline_rows_per_sec);
    let mut all_met = true;
    println!();
    for report in &reports {
        all_met &= print_summary(report, pg_baseline_rows_per_sec);
    }
    Ok(super::exit_status(args.check, all_met))
}

/// Tally on a temporary SQLite file, then the baseline on another file in the
/// same directory.
async fn run_sqlite(args: &IngestArgs, rows: &[Row], batches: Vec<Batch>) -> anyhow::Result<EngineReport> {
    let scratch = SqliteScratch::new()?;
    let url = scratch.url("bench.db");
    let tally_elapsed = measure_tally(args, Engine::Sqlite, &url, batches).await?;

    eprintln!(
        "[sqlite] baseline: {} rows, one transaction, one prepared statement…",
        rows.len()
    );
    let baseline_elapsed = sqlite_baseline(&scratch, "baseline.db", rows).await?;
    let landed = count_rows(&scratch.url("baseline.db"), "baseline").await?;
    ensure!(
        landed == args.entries,
        "the SQLite baseline table holds {landed} rows, expected {}",
        args.entries
    );

    eprintln!("[sqlite] reference: {SQLITE_ROWS_PER_STATEMENT} rows per execution of one prepared statement…");
    let reference_elapsed = sqlite_multi_row(&scratch, "reference.db", rows).await?;
    let landed = count_rows(&scratch.url("reference.db"), "baseline").await?;
    ensure!(
        landed == args.entries,
        "the SQLite reference table holds {landed} rows, expected {}",
        args.entries
    );
    Ok(EngineReport {
        engine: Engine::Sqlite,
        entries: args.entries,
        tally_elapsed,
        baseline_elapsed,
        reference_elapsed: Some(reference_elapsed),
    })
}

/// Tally on a database of a throwaway cluster, then `psql \copy` into a plain
/// table in another database of the same cluster.
async fn run_postgres(args: &IngestArgs, rows: &[Row], batches: Vec<Batch>) -> anyhow::Result<EngineReport> {
    eprintln!("[postgres] starting a throwaway cluster ({PG_CLUSTER_SETTINGS})…");
    let pg = PgScratch::start().await?;
    let tally_url = pg.create_database().await?;
    let baseline_url = pg.create_database().await?;

    pg.checkpoint().await?;
    let tally_elapsed = measure_tally(args, Engine::Postgres, &tally_url, batches).await?;

    let dir = tempfile::Builder::new().prefix("tally-bench-").tempdir()?;
    let csv_path = dir.path().join("rows.csv");
    write_csv(&csv_path, rows)?;
    create_pg_baseline_table(&baseline_url).await?;
    pg.checkpoint().await?;
    eprintln!("[postgres] baseline: psql \\copy of {} rows…", rows.len());
    let baseline_elapsed = psql_copy(&pg, &baseline_url, &csv_path).await?;
    let landed = count_rows(&baseline_url, "baseline").await?;
    ensure!(
        landed == args.entries,
        "the PostgreSQL baseline table holds {landed} rows, expected {}",
        args.entries
    );
    Ok(EngineReport {
        engine: Engine::Postgres,
        entries: args.entries,
        tally_elapsed,
        baseline_elapsed,
        reference_elapsed: None,
    })
}

/// Starts Tally on `url`, posts every batch, stops it, and checks that
/// exactly `--entries` rows landed. Returns the posting time.
async fn measure_tally(args: &IngestArgs, engine: Engine, url: &str, batches: Vec<Batch>) -> anyhow::Result<Duration> {
    let tally = RunningTally::start(url).await?;
    eprintln!(
        "[{engine}] Tally: posting {} entries in {} batches over {} connections…",
        args.entries,
        batches.len(),
        args.connections
    );
    let posted = post_all(&tally, batches, args.connections, args.entries).await;
    tally.stop().await?;
    let elapsed = posted?;
    let landed = count_rows(url, "entries").await?;
    ensure!(
        landed == args.entries,
        "Tally's entries table holds {landed} rows after posting {}",
        args.entries
    );
    Ok(elapsed)
}

/// Posts every batch over `connections` concurrent clients; each client takes
/// the next batch as soon as its previous one is answered. Returns the wall
/// time from the first request to the last response.
async fn post_all(tally: &RunningTally, batches: Vec<Batch>, connections: u64, total: u64) -> anyhow::Result<Duration> {
    let url: Arc<str> = tally.url("/v1/entries").into();
    let auth: Arc<str> = format!("Bearer {}", tally.admin_key()).into();
    let queue = Arc::new(Mutex::new(batches.into_iter()));
    let progress = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("  {bar:40} {pos}/{len} entries  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // One client per connection, so each holds exactly one keep-alive connection.
    let clients = (0..connections)
        .map(|_| {
            reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .tcp_nodelay(true)
                .timeout(Duration::from_secs(600))
                .build()
        })
        .collect::<reqwest::Result<Vec<_>>>()
        .context("building HTTP clients")?;

    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for client in clients {
        let (url, auth, queue, progress) = (url.clone(), auth.clone(), queue.clone(), progress.clone());
        tasks.spawn(async move {
            loop {
                let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
                let Some(batch) = next else { return anyhow::Ok(()) };
                let entries = batch.entries;
                post_batch(&client, &url, &auth, batch).await?;
                progress.inc(entries as u64);
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        // An error drops `tasks`, which aborts the other clients.
        joined.context("an HTTP client task panicked")??;
    }
    let elapsed = start.elapsed();
    progress.finish_and_clear();
    Ok(elapsed)
}

/// Posts one batch and checks the answer: 200, every entry created.
async fn post_batch(client: &reqwest::Client, url: &str, auth: &str, batch: Batch) -> anyhow::Result<()> {
    let expected = batch.entries;
    let response = client
        .post(url)
        .header(AUTHORIZATION, auth)
        .header(CONTENT_TYPE, "application/json")
        .body(batch.body)
        .send()
        .await
        .context("POST /v1/entries")?;
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .context("reading the POST /v1/entries response")?;
    if status != reqwest::StatusCode::OK {
        let text = String::from_utf8_lossy(&bytes);
        let excerpt: String = text.chars().take(500).collect();
        bail!("POST /v1/entries answered {status}: {excerpt}");
    }
    let answer: PostResponse = serde_json::from_slice(&bytes).context("parsing the POST /v1/entries response")?;
    ensure!(
        answer.created == expected,
        "POST /v1/entries created {} of {expected} entries",
        answer.created
    );
    Ok(())
}

/// The SQLite baseline table: a primary key and the idempotency constraint.
const SQLITE_BASELINE_TABLE: &str = "CREATE TABLE baseline (
    id              INTEGER PRIMARY KEY,
    account         TEXT    NOT NULL,
    resource        TEXT    NOT NULL,
    amount          INTEGER NOT NULL,
    occurred_at     INTEGER NOT NULL,
    idempotency_key TEXT    NOT NULL,
    UNIQUE (account, idempotency_key)
)";

/// The one statement the SQLite baseline prepares and runs per row.
const SQLITE_BASELINE_INSERT: &str =
    "INSERT INTO baseline (account, resource, amount, occurred_at, idempotency_key) VALUES (?, ?, ?, ?, ?)";

/// Inserts `rows` into a fresh table in file `name`: one connection, one
/// transaction, one prepared statement (sqlx caches it on the connection).
/// Returns the time from `BEGIN` to the end of `COMMIT`.
async fn sqlite_baseline(scratch: &SqliteScratch, name: &str, rows: &[Row]) -> anyhow::Result<Duration> {
    use sqlx::Connection as _;

    let mut conn = scratch.connect(name).await?;
    sqlx::raw_sql(SQLITE_BASELINE_TABLE).execute(&mut conn).await?;
    let start = Instant::now();
    let mut tx = conn.begin().await?;
    for row in rows {
        sqlx::query(SQLITE_BASELINE_INSERT)
            .bind(row.account.as_str())
            .bind(row.resource)
            .bind(row.amount)
            .bind(row.occurred_at.timestamp_micros())
            .bind(row.idempotency_key.as_str())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    let elapsed = start.elapsed();
    conn.close().await.ok();
    Ok(elapsed)
}

/// Rows per execution in the SQLite reference load (5 parameters each, well
/// under SQLite's limit of 32 766).
pub const SQLITE_ROWS_PER_STATEMENT: usize = 100;

/// Like [`sqlite_baseline`], but each execution of the one prepared statement
/// inserts [`SQLITE_ROWS_PER_STATEMENT`] rows (the remainder, if any, goes
/// through the one-row statement). Not a target: it shows how much of the
/// one-row-per-execution baseline is the driver's per-statement cost (sqlx
/// hands every statement to a worker thread and back).
async fn sqlite_multi_row(scratch: &SqliteScratch, name: &str, rows: &[Row]) -> anyhow::Result<Duration> {
    use sqlx::Connection as _;

    let values = vec!["(?, ?, ?, ?, ?)"; SQLITE_ROWS_PER_STATEMENT].join(", ");
    let multi_insert =
        format!("INSERT INTO baseline (account, resource, amount, occurred_at, idempotency_key) VALUES {values}");
    let mut conn = scratch.connect(name).await?;
    sqlx::raw_sql(SQLITE_BASELINE_TABLE).execute(&mut conn).await?;
    let start = Instant::now();
    let mut tx = conn.begin().await?;
    let mut chunks = rows.chunks_exact(SQLITE_ROWS_PER_STATEMENT);
    for chunk in &mut chunks {
        let mut query = sqlx::query(&multi_insert);
        for row in chunk {
            query = query
                .bind(row.account.as_str())
                .bind(row.resource)
                .bind(row.amount)
                .bind(row.occurred_at.timestamp_micros())
                .bind(row.idempotency_key.as_str());
        }
        query.execute(&mut *tx).await?;
    }
    for row in chunks.remainder() {
        sqlx::query(SQLITE_BASELINE_INSERT)
            .bind(row.account.as_str())
            .bind(row.resource)
            .bind(row.amount)
            .bind(row.occurred_at.timestamp_micros())
            .bind(row.idempotency_key.as_str())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    let elapsed = start.elapsed();
    conn.close().await.ok();
    Ok(elapsed)
}

/// The PostgreSQL baseline table: a primary key and the idempotency constraint.
const PG_BASELINE_TABLE: &str = "CREATE TABLE baseline (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account         TEXT        NOT NULL,
    resource        TEXT        NOT NULL,
    amount          BIGINT      NOT NULL,
    occurred_at     TIMESTAMPTZ NOT NULL,
    idempotency_key TEXT        NOT NULL,
    UNIQUE (account, idempotency_key)
)";

/// Creates the baseline table in the database at `url`.
async fn create_pg_baseline_table(url: &str) -> anyhow::Result<()> {
    use sqlx::Connection as _;

    let mut conn = sqlx::PgConnection::connect(url).await?;
    sqlx::raw_sql(PG_BASELINE_TABLE).execute(&mut conn).await?;
    conn.close().await.ok();
    Ok(())
}

/// Writes `rows` as headerless CSV: account, resource, amount, occurred_at
/// (RFC 3339), idempotency_key.
fn write_csv(path: &Path, rows: &[Row]) -> anyhow::Result<()> {
    let mut writer = csv::WriterBuilder::new()
        .has_headers(false)
        .from_path(path)
        .with_context(|| format!("creating {}", path.display()))?;
    for row in rows {
        writer.write_record([
            row.account.as_str(),
            row.resource,
            &row.amount.to_string(),
            &rfc3339(row.occurred_at),
            row.idempotency_key.as_str(),
        ])?;
    }
    writer.flush()?;
    Ok(())
}

/// Times `psql -c "\copy baseline(…) FROM 'csv' WITH (FORMAT csv)"` against
/// the database at `url`, over the cluster's Unix socket.
async fn psql_copy(pg: &PgScratch, url: &str, csv_path: &Path) -> anyhow::Result<Duration> {
    let database = pg_database_name(url)?;
    let quoted_path = csv_path.display().to_string().replace('\'', "''");
    let copy = format!(
        "\\copy baseline (account, resource, amount, occurred_at, idempotency_key) FROM '{quoted_path}' WITH (FORMAT csv)"
    );
    let psql = pg.psql();
    let mut command = tokio::process::Command::new(&psql);
    command
        .arg("-X")
        .args(["-v", "ON_ERROR_STOP=1", "-q"])
        .arg("-h")
        .arg(pg.cluster().socket_dir())
        .arg("-p")
        .arg(pg.cluster().port().to_string())
        .args(["-U", "tally", "-d", database, "-c", &copy])
        .env_remove("PGSERVICE")
        .env_remove("PGOPTIONS")
        .stdin(std::process::Stdio::null());
    let start = Instant::now();
    let output = command
        .output()
        .await
        .with_context(|| format!("running {}", psql.display()))?;
    let elapsed = start.elapsed();
    if !output.status.success() {
        bail!(
            "{} failed ({}): {}{}",
            psql.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(elapsed)
}

/// Prints one engine's block to stdout.
fn print_report(args: &IngestArgs, cores: usize, report: &EngineReport) {
    let tally_seconds = report.tally_elapsed.as_secs_f64();
    let baseline_seconds = report.baseline_elapsed.as_secs_f64();
    println!();
    println!(
        "ingest  engine={}  entries={} batch={} connections={} accounts={} cores={cores}",
        report.engine, report.entries, args.batch, args.connections, args.accounts
    );
    println!("  settings  {}", report.settings());
    println!(
        "  tally    {:>8.0} entries/s  ({tally_seconds:.2} s)  [HTTP, POST /v1/entries]",
        report.tally_rows_per_sec()
    );
    println!(
        "  baseline {:>8.0} rows/s     ({baseline_seconds:.2} s)  [{}]",
        report.baseline_rows_per_sec(),
        report.baseline_method()
    );
    println!("  ratio    {:>8.2} × baseline", report.ratio());
    if let (Some(reference_rows_per_sec), Some(elapsed)) = (report.reference_rows_per_sec(), report.reference_elapsed) {
        let reference_seconds = elapsed.as_secs_f64();
        println!(
            "  reference {reference_rows_per_sec:>7.0} rows/s     ({reference_seconds:.2} s)  [not a target: one transaction, \
             one prepared statement, {SQLITE_ROWS_PER_STATEMENT} rows per execution; tally = {:.2} × this]",
            ratio_of(report.tally_rows_per_sec(), reference_rows_per_sec)
        );
    }
    std::io::stdout().flush().ok();
}

/// Prints one engine's summary line; returns whether every target is met.
fn print_summary(report: &EngineReport, pg_baseline_rows_per_sec: Option<f64>) -> bool {
    let tally_rows_per_sec = report.tally_rows_per_sec();
    let target_rate = TARGET_ENTRIES_PER_SEC as f64;
    let rate_met = tally_rows_per_sec >= target_rate;
    let rate_verdict = if rate_met {
        format!("met (+{:.0}%)", (tally_rows_per_sec / target_rate - 1.0) * 100.0)
    } else {
        format!("NOT met ({:.0}% of target)", tally_rows_per_sec / target_rate * 100.0)
    };
    let (pg_ratio_text, pg_ratio_met) = match pg_baseline_rows_per_sec {
        Some(baseline_rows_per_sec) => {
            let pg_ratio = ratio_of(tally_rows_per_sec, baseline_rows_per_sec);
            let met = pg_ratio >= 1.0;
            let verdict = if met { "met" } else { "NOT met" };
            (format!("{pg_ratio:.2} (target ≥ 1.00: {verdict})"), met)
        }
        None => ("n/a (PostgreSQL baseline not run; use --engine both)".to_owned(), true),
    };
    println!(
        "summary engine={:<8} tally={:.0} entries/s (target ≥ {TARGET_ENTRIES_PER_SEC}: {rate_verdict})  \
         ratio_vs_own_baseline={:.2}  ratio_vs_pg_baseline={pg_ratio_text}",
        report.engine.name(),
        tally_rows_per_sec,
        report.ratio(),
    );
    rate_met && pg_ratio_met
}
