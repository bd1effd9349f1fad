//! `tally-bench rollup` and `tally-bench rollup-lag`: folding the ledger into
//! daily and monthly totals.
//!
//! `rollup`, per engine:
//!
//! 1. A database created by Tally's migrations gets `--rows` ledger rows,
//!    generated inside the database by one statement ([`SqlLedger`]: `--accounts`
//!    accounts, the built-in resources round-robin, `occurred_at` spread over
//!    `--days` days). The database is then copied (SQLite: the file;
//!    PostgreSQL: `CREATE DATABASE … TEMPLATE`), so the baseline reads an
//!    identical ledger.
//! 2. **Tally**: `tally::jobs::rollup::run` with `--batch-size`, timed; every
//!    row must be folded, and the totals must add up to the ledger
//!    (`SUM(amount)` and `COUNT(*)` of `monthly_totals` and of `daily_totals`
//!    against `entries`; with `--verify`, also `Store::verify_totals`, a full
//!    recomputation).
//! 3. **Baseline**, on the copy: one `INSERT … SELECT … GROUP BY …
//!    ON CONFLICT DO UPDATE` for the days and one for the months, over every
//!    row, into plain tables with the same primary keys, using the same bucket
//!    expressions as Tally's `rollup_fold.sql` (SQLite: `rollup_stage_days.sql`).
//!
//! `rollup-lag`, per engine: Tally in-process with its scheduled jobs (the
//! rollup every 10 s), entries posted at a steady `--rate` for
//! `--lag-seconds`, and `GET /healthz` polled every second for
//! `rollup_lag_seconds`; it prints the maximum and the 95th percentile.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Args;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use sqlx::Connection as _;

use super::harness::{PG_CLUSTER_SETTINGS, PgScratch, RunningTally, SQLITE_SETTINGS, SqliteScratch, fill_ledger};
use super::workload::{SqlLedger, Workload, batch_body};
use super::{Engine, EngineChoice, rate};
use crate::app::Settings;
use crate::jobs::rollup::{DEFAULT_BATCH, RollupOptions};
use crate::telemetry::Metrics;

/// Target fold rate of Tally on each engine, entries per second.
pub const TARGET_ENTRIES_PER_SEC: u64 = 250_000;
/// Target ratio of Tally's fold rate to the baseline's.
pub const TARGET_RATIO: f64 = 0.8;
/// Target maximum of `/healthz`'s `rollup_lag_seconds` under steady ingestion.
pub const TARGET_LAG_SECONDS: i64 = 15;

/// Options of `tally-bench rollup`.
#[derive(Debug, Clone, Args)]
pub struct RollupArgs {
    /// Ledger rows to fold (each engine gets the same rows).
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub rows: u64,
    /// Distinct accounts the rows spread over.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub accounts: u64,
    /// Days `occurred_at` spreads over (ending one minute ago).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3650))]
    pub days: u64,
    /// Which engines to measure.
    #[arg(long, value_enum, default_value_t = EngineChoice::Both)]
    pub engine: EngineChoice,
    /// Rows per rollup batch (one transaction each).
    #[arg(long, default_value_t = DEFAULT_BATCH, value_parser = clap::value_parser!(u32).range(1..))]
    pub batch_size: u32,
    /// The most rows a batch grows to while catching up (default: the
    /// engine's bound, as `tally rollup` uses).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_batch_size: Option<u32>,
    /// Also run `Store::verify_totals` (a full recomputation) after folding.
    #[arg(long)]
    pub verify: bool,
    /// Exit with status 1 when a target is missed.
    #[arg(long)]
    pub check: bool,
}

/// Options of `tally-bench rollup-lag`.
#[derive(Debug, Clone, Args)]
pub struct LagArgs {
    /// How long to post, in seconds.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub lag_seconds: u64,
    /// Entries per second to post.
    #[arg(long, default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(10..))]
    pub rate: u64,
    /// Requests per second (the rate is split into this many batches a second).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub requests_per_second: u64,
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

/// One engine's `rollup` measurements.
#[derive(Debug, Clone)]
struct FoldReport {
    engine: Engine,
    rows: u64,
    generate_elapsed: Duration,
    tally_elapsed: Duration,
    tally_batches: u64,
    baseline_daily: Duration,
    baseline_monthly: Duration,
    daily_rows: u64,
    monthly_rows: u64,
    verified: &'static str,
}

impl FoldReport {
    fn tally_rows_per_sec(&self) -> f64 {
        rate(self.rows, self.tally_elapsed)
    }

    fn baseline_rows_per_sec(&self) -> f64 {
        rate(self.rows, self.baseline_daily + self.baseline_monthly)
    }

    fn ratio(&self) -> f64 {
        let baseline_rows_per_sec = self.baseline_rows_per_sec();
        if baseline_rows_per_sec > 0.0 {
            self.tally_rows_per_sec() / baseline_rows_per_sec
        } else {
            0.0
        }
    }
}

/// Runs `tally-bench rollup`.
///
/// # Errors
///
/// Fails when a database cannot be set up, the rollup fails or folds a
/// different number of rows, or the totals do not add up to the ledger.
pub async fn run(args: &RollupArgs) -> anyhow::Result<ExitCode> {
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mut all_met = true;
    let mut reports = Vec::new();
    for engine in args.engine.engines() {
        let report = fold_on(args, engine)
            .await
            .with_context(|| format!("rollup benchmark on {engine}"))?;
        print_fold_report(args, cores, &report);
        reports.push(report);
    }
    println!();
    for report in &reports {
        let tally_rows_per_sec = report.tally_rows_per_sec();
        let rate_met = tally_rows_per_sec >= TARGET_ENTRIES_PER_SEC as f64;
        let ratio_met = report.ratio() >= TARGET_RATIO;
        all_met &= rate_met && ratio_met;
        println!(
            "summary engine={:<8} tally={tally_rows_per_sec:.0} entries/s (target ≥ {TARGET_ENTRIES_PER_SEC}: {})  \
             ratio={:.2} (target ≥ {TARGET_RATIO:.2}: {})",
            report.engine.name(),
            verdict(rate_met, tally_rows_per_sec / TARGET_ENTRIES_PER_SEC as f64),
            report.ratio(),
            verdict(ratio_met, report.ratio() / TARGET_RATIO),
        );
    }
    Ok(super::exit_status(args.check, all_met))
}

/// "met (+N%)" or "NOT met (N% of target)" for a measured/target ratio.
fn verdict(met: bool, of_target_ratio: f64) -> String {
    if met {
        format!("met, {:.0}% of target", of_target_ratio * 100.0)
    } else {
        format!("NOT met, {:.0}% of target", of_target_ratio * 100.0)
    }
}

/// The ledger `rollup` folds.
fn ledger(args: &RollupArgs) -> SqlLedger {
    SqlLedger {
        first: 0,
        count: args.rows,
        accounts: args.accounts,
        account_prefix: "acct-".into(),
        resource: None,
        days: args.days,
        base_epoch_seconds: chrono::Utc::now().timestamp() - 60,
        key_prefix: "r-".into(),
    }
}

async fn fold_on(args: &RollupArgs, engine: Engine) -> anyhow::Result<FoldReport> {
    let ledger = ledger(args);
    // Each arm generates the ledger, copies it for the baseline, folds it
    // with Tally and runs the baseline on the copy; the scratch database
    // lives until the arm ends.
    let (generate_elapsed, (tally_elapsed, tally_batches, verified), baseline) = match engine {
        Engine::Sqlite => {
            let scratch = SqliteScratch::new()?;
            let url = scratch.url("rollup.db");
            let generate_elapsed = generate(engine, &url, &ledger).await?;
            std::fs::copy(scratch.path("rollup.db"), scratch.path("baseline.db")).context("copying the database")?;
            let tally = fold_with_tally(args, engine, &url).await?;
            let mut conn = scratch.connect("baseline.db").await?;
            let baseline = sqlite_baseline(&mut conn).await?;
            conn.close().await.ok();
            (generate_elapsed, tally, baseline)
        }
        Engine::Postgres => {
            eprintln!("[postgres] starting a throwaway cluster ({PG_CLUSTER_SETTINGS})…");
            let pg = PgScratch::start().await?;
            let url = pg.create_database().await?;
            let generate_elapsed = generate(engine, &url, &ledger).await?;
            let baseline_url = pg.clone_database(&url).await?;
            pg.checkpoint().await?;
            let tally = fold_with_tally(args, engine, &url).await?;
            pg.checkpoint().await?;
            let mut conn = sqlx::PgConnection::connect(&baseline_url).await?;
            let baseline = pg_baseline(&mut conn).await?;
            conn.close().await.ok();
            (generate_elapsed, tally, baseline)
        }
    };
    Ok(FoldReport {
        engine,
        rows: args.rows,
        generate_elapsed,
        tally_elapsed,
        tally_batches,
        baseline_daily: baseline.0,
        baseline_monthly: baseline.1,
        daily_rows: baseline.2,
        monthly_rows: baseline.3,
        verified,
    })
}

/// Migrates an empty database and fills its ledger; returns how long the
/// filling took.
async fn generate(engine: Engine, url: &str, ledger: &SqlLedger) -> anyhow::Result<Duration> {
    drop(open(url).await?);
    eprintln!("[{engine}] generating {} ledger rows…", ledger.count);
    let generate_elapsed = fill_ledger(url, ledger, true).await?;
    eprintln!(
        "[{engine}] generated in {:.1} s; copying the database for the baseline…",
        secs(generate_elapsed)
    );
    Ok(generate_elapsed)
}

fn secs(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64()
}

async fn open(url: &str) -> anyhow::Result<Arc<dyn crate::store::Store>> {
    let settings = Settings {
        database_url: url.to_owned(),
        ..Settings::default()
    };
    Ok(settings.open_store().await?.0)
}

/// Times Tally's rollup over the whole ledger and checks the totals.
async fn fold_with_tally(
    args: &RollupArgs,
    engine: Engine,
    url: &str,
) -> anyhow::Result<(Duration, u64, &'static str)> {
    let store = open(url).await?;
    let options = RollupOptions {
        batch_size: args.batch_size,
        failpoint: None,
        max_batch_size: args.max_batch_size,
    };
    eprintln!(
        "[{engine}] Tally: folding {} rows, first batch {}, growing to the backlog up to {}…",
        args.rows,
        args.batch_size,
        args.max_batch_size.unwrap_or_else(|| store.rollup_batch_cap())
    );
    let start = Instant::now();
    let report = crate::jobs::rollup::run(store.as_ref(), &options, &Metrics::default()).await?;
    let elapsed = start.elapsed();
    ensure!(
        report.entries == args.rows,
        "the rollup folded {} rows, expected {}",
        report.entries,
        args.rows
    );
    eprintln!(
        "[{engine}] folded in {:.2} s; checking the totals against the ledger…",
        secs(elapsed)
    );
    check_sums(url).await?;
    let verified = if args.verify {
        let mismatches = store.verify_totals().await?;
        ensure!(
            mismatches.is_empty(),
            "verify_totals found {} mismatches, first: {:?}",
            mismatches.len(),
            mismatches.first()
        );
        "verify_totals: no mismatch; sums and counts equal"
    } else {
        "sums and counts of daily_totals and monthly_totals equal the ledger's"
    };
    Ok((elapsed, report.batches, verified))
}

/// `SUM(amount)` and `COUNT(*)` of the ledger equal the sums of `amount` and
/// `entries` in both totals tables.
async fn check_sums(url: &str) -> anyhow::Result<()> {
    let sql = "SELECT (SELECT SUM(amount) FROM entries), (SELECT COUNT(*) FROM entries), \
               (SELECT SUM(amount) FROM daily_totals), (SELECT SUM(entries) FROM daily_totals), \
               (SELECT SUM(amount) FROM monthly_totals), (SELECT SUM(entries) FROM monthly_totals)";
    let pg_sql = "SELECT (SELECT SUM(amount) FROM entries)::bigint, (SELECT COUNT(*) FROM entries)::bigint, \
                  (SELECT SUM(amount) FROM daily_totals)::bigint, (SELECT SUM(entries) FROM daily_totals)::bigint, \
                  (SELECT SUM(amount) FROM monthly_totals)::bigint, (SELECT SUM(entries) FROM monthly_totals)::bigint";
    let sums: (i64, i64, i64, i64, i64, i64) = if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await?;
        sqlx::query_as(sql).fetch_one(&mut conn).await?
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        sqlx::query_as(pg_sql).fetch_one(&mut conn).await?
    };
    let (amount, count, daily_amount, daily_count, monthly_amount, monthly_count) = sums;
    if (amount, count) != (daily_amount, daily_count) || (amount, count) != (monthly_amount, monthly_count) {
        bail!(
            "totals do not add up: ledger (sum {amount}, rows {count}), daily ({daily_amount}, {daily_count}), \
             monthly ({monthly_amount}, {monthly_count})"
        );
    }
    Ok(())
}

/// Baseline DDL and statements for one engine: (create tables, daily fold, monthly fold).
const SQLITE_BASELINE: [&str; 3] = [
    "CREATE TABLE daily_totals_baseline (account TEXT NOT NULL, resource TEXT NOT NULL, day TEXT NOT NULL, \
     amount INTEGER NOT NULL, entries INTEGER NOT NULL, PRIMARY KEY (account, resource, day)) STRICT, WITHOUT ROWID; \
     CREATE TABLE monthly_totals_baseline (account TEXT NOT NULL, resource TEXT NOT NULL, month TEXT NOT NULL, \
     amount INTEGER NOT NULL, entries INTEGER NOT NULL, PRIMARY KEY (account, resource, month)) STRICT, WITHOUT ROWID",
    "INSERT INTO daily_totals_baseline (account, resource, day, amount, entries) \
     SELECT account, resource, date(occurred_at / 1000000, 'unixepoch'), SUM(amount), COUNT(*) FROM entries \
     WHERE true GROUP BY 1, 2, 3 \
     ON CONFLICT (account, resource, day) DO UPDATE SET amount = amount + excluded.amount, entries = entries + excluded.entries",
    "INSERT INTO monthly_totals_baseline (account, resource, month, amount, entries) \
     SELECT account, resource, strftime('%Y-%m-01', occurred_at / 1000000, 'unixepoch'), SUM(amount), COUNT(*) \
     FROM entries WHERE true GROUP BY 1, 2, 3 \
     ON CONFLICT (account, resource, month) DO UPDATE SET amount = amount + excluded.amount, entries = entries + excluded.entries",
];

const PG_BASELINE: [&str; 3] = [
    "CREATE TABLE daily_totals_baseline (account TEXT NOT NULL, resource TEXT NOT NULL, day DATE NOT NULL, \
     amount BIGINT NOT NULL, entries BIGINT NOT NULL, PRIMARY KEY (account, resource, day)); \
     CREATE TABLE monthly_totals_baseline (account TEXT NOT NULL, resource TEXT NOT NULL, month DATE NOT NULL, \
     amount BIGINT NOT NULL, entries BIGINT NOT NULL, PRIMARY KEY (account, resource, month))",
    "INSERT INTO daily_totals_baseline (account, resource, day, amount, entries) \
     SELECT account, resource, (occurred_at AT TIME ZONE 'UTC')::date, SUM(amount)::bigint, COUNT(*) FROM entries \
     GROUP BY 1, 2, 3 \
     ON CONFLICT (account, resource, day) DO UPDATE SET amount = daily_totals_baseline.amount + excluded.amount, \
     entries = daily_totals_baseline.entries + excluded.entries",
    "INSERT INTO monthly_totals_baseline (account, resource, month, amount, entries) \
     SELECT account, resource, date_trunc('month', occurred_at AT TIME ZONE 'UTC')::date, SUM(amount)::bigint, COUNT(*) \
     FROM entries GROUP BY 1, 2, 3 \
     ON CONFLICT (account, resource, month) DO UPDATE SET amount = monthly_totals_baseline.amount + excluded.amount, \
     entries = monthly_totals_baseline.entries + excluded.entries",
];

/// (daily time, monthly time, daily rows, monthly rows).
type BaselineTimes = (Duration, Duration, u64, u64);

async fn sqlite_baseline(conn: &mut sqlx::SqliteConnection) -> anyhow::Result<BaselineTimes> {
    eprintln!("[sqlite] baseline: one INSERT … SELECT … GROUP BY … ON CONFLICT DO UPDATE per table…");
    sqlx::raw_sql(SQLITE_BASELINE[0]).execute(&mut *conn).await?;
    let start = Instant::now();
    let daily = sqlx::query(SQLITE_BASELINE[1])
        .execute(&mut *conn)
        .await?
        .rows_affected();
    let daily_elapsed = start.elapsed();
    let start = Instant::now();
    let monthly = sqlx::query(SQLITE_BASELINE[2])
        .execute(&mut *conn)
        .await?
        .rows_affected();
    let monthly_elapsed = start.elapsed();
    let (a, b, c): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT SUM(amount) FROM entries), (SELECT SUM(amount) FROM daily_totals_baseline), \
         (SELECT SUM(amount) FROM monthly_totals_baseline)",
    )
    .fetch_one(&mut *conn)
    .await?;
    ensure!(a == b && a == c, "baseline totals do not add up: {a} {b} {c}");
    Ok((daily_elapsed, monthly_elapsed, daily, monthly))
}

async fn pg_baseline(conn: &mut sqlx::PgConnection) -> anyhow::Result<BaselineTimes> {
    eprintln!("[postgres] baseline: one INSERT … SELECT … GROUP BY … ON CONFLICT DO UPDATE per table…");
    sqlx::raw_sql(PG_BASELINE[0]).execute(&mut *conn).await?;
    let start = Instant::now();
    let daily = sqlx::query(PG_BASELINE[1]).execute(&mut *conn).await?.rows_affected();
    let daily_elapsed = start.elapsed();
    let start = Instant::now();
    let monthly = sqlx::query(PG_BASELINE[2]).execute(&mut *conn).await?.rows_affected();
    let monthly_elapsed = start.elapsed();
    let (a, b, c): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT SUM(amount) FROM entries)::bigint, (SELECT SUM(amount) FROM daily_totals_baseline)::bigint, \
         (SELECT SUM(amount) FROM monthly_totals_baseline)::bigint",
    )
    .fetch_one(&mut *conn)
    .await?;
    ensure!(a == b && a == c, "baseline totals do not add up: {a} {b} {c}");
    Ok((daily_elapsed, monthly_elapsed, daily, monthly))
}

fn print_fold_report(args: &RollupArgs, cores: usize, report: &FoldReport) {
    let settings = match report.engine {
        Engine::Sqlite => format!("{SQLITE_SETTINGS} (Tally and baseline alike)"),
        Engine::Postgres => format!("throwaway cluster, {PG_CLUSTER_SETTINGS} (Tally and baseline alike)"),
    };
    println!();
    println!(
        "rollup  engine={}  rows={} accounts={} days={} batch_size={} max_batch_size={} cores={cores}",
        report.engine,
        report.rows,
        args.accounts,
        args.days,
        args.batch_size,
        args.max_batch_size
            .map_or_else(|| "engine default".to_owned(), |cap| cap.to_string()),
    );
    println!("  settings  {settings}");
    println!(
        "  generated {} rows in SQL in {:.1} s (not measured against anything)",
        report.rows,
        secs(report.generate_elapsed)
    );
    println!(
        "  tally    {:>9.0} entries/s  ({:.2} s, {} batches)  [jobs::rollup::run]",
        report.tally_rows_per_sec(),
        secs(report.tally_elapsed),
        report.tally_batches
    );
    println!(
        "  baseline {:>9.0} rows/s     ({:.2} s = daily {:.2} s + monthly {:.2} s; {} daily rows, {} monthly rows)  \
         [one INSERT … SELECT … GROUP BY … ON CONFLICT DO UPDATE per table]",
        report.baseline_rows_per_sec(),
        secs(report.baseline_daily + report.baseline_monthly),
        secs(report.baseline_daily),
        secs(report.baseline_monthly),
        report.daily_rows,
        report.monthly_rows
    );
    println!("  ratio    {:>9.2} × baseline", report.ratio());
    println!("  checked  {}", report.verified);
    std::io::stdout().flush().ok();
}

/// Runs `tally-bench rollup-lag`.
///
/// # Errors
///
/// Fails when a database or Tally cannot be started or `/healthz` cannot be
/// read.
pub async fn run_lag(args: &LagArgs) -> anyhow::Result<ExitCode> {
    let mut all_met = true;
    let mut lines = Vec::new();
    for engine in args.engine.engines() {
        let (met, line) = lag_on(args, engine)
            .await
            .with_context(|| format!("rollup-lag benchmark on {engine}"))?;
        all_met &= met;
        lines.push(line);
    }
    println!();
    for line in lines {
        println!("{line}");
    }
    Ok(super::exit_status(args.check, all_met))
}

async fn lag_on(args: &LagArgs, engine: Engine) -> anyhow::Result<(bool, String)> {
    let sqlite;
    let pg;
    let url = match engine {
        Engine::Sqlite => {
            sqlite = SqliteScratch::new()?;
            sqlite.url("lag.db")
        }
        Engine::Postgres => {
            eprintln!("[postgres] starting a throwaway cluster ({PG_CLUSTER_SETTINGS})…");
            pg = PgScratch::start().await?;
            pg.create_database().await?
        }
    };
    let per_request = (args.rate / args.requests_per_second).max(1);
    let requests = args.lag_seconds * args.requests_per_second;
    let workload = Workload::recent(args.accounts);
    let bodies = (0..requests)
        .map(|n| batch_body(&workload.rows_from(n * per_request, per_request)))
        .collect::<serde_json::Result<Vec<Vec<u8>>>>()?;
    let tally = RunningTally::start_with_jobs(&url).await?;
    eprintln!(
        "[{engine}] Tally with scheduled jobs: posting {per_request} entries every {} ms for {} s, polling /healthz every second…",
        1000 / args.requests_per_second,
        args.lag_seconds
    );
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(120))
        .build()?;
    let posted = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (client, url, stop) = (client.clone(), tally.url("/healthz"), stop.clone());
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let value: serde_json::Value = client.get(&url).send().await?.json().await?;
                let lag = value["rollup_lag_seconds"]
                    .as_i64()
                    .with_context(|| format!("no rollup_lag_seconds in {value}"))?;
                samples.push(lag);
            }
            anyhow::Ok(samples)
        })
    };
    let url_entries = tally.url("/v1/entries");
    let auth = format!("Bearer {}", tally.admin_key());
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / args.requests_per_second));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut in_flight = tokio::task::JoinSet::new();
    let start = Instant::now();
    for body in bodies {
        tick.tick().await;
        let (client, url, auth, posted, failed) = (
            client.clone(),
            url_entries.clone(),
            auth.clone(),
            posted.clone(),
            failed.clone(),
        );
        in_flight.spawn(async move {
            let response = client
                .post(&url)
                .header(AUTHORIZATION, auth)
                .header(CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await;
            match response {
                Ok(r) if r.status().is_success() => posted.fetch_add(per_request, Ordering::Relaxed),
                _ => failed.fetch_add(1, Ordering::Relaxed),
            };
        });
        while in_flight.try_join_next().is_some() {}
    }
    while in_flight.join_next().await.is_some() {}
    let post_elapsed = start.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut samples = poller.await.context("the /healthz poller panicked")??;
    tally.stop().await?;
    ensure!(!samples.is_empty(), "no /healthz sample");
    let posted = posted.load(Ordering::Relaxed);
    let failed = failed.load(Ordering::Relaxed);
    let achieved_rate = rate(posted, post_elapsed);
    samples.sort_unstable();
    let max = samples.last().copied().unwrap_or_default();
    let p95 = samples[((samples.len() * 95).div_ceil(100)).saturating_sub(1)];
    let mean_lag_seconds = samples.iter().sum::<i64>() as f64 / samples.len() as f64;
    let met = max < TARGET_LAG_SECONDS && failed == 0;
    println!();
    println!(
        "rollup-lag  engine={engine}  rate={}/s ({per_request} entries every {} ms) seconds={} accounts={} jobs=built-in (rollup every 10 s)",
        args.rate,
        1000 / args.requests_per_second,
        args.lag_seconds,
        args.accounts
    );
    println!(
        "  posted   {posted} entries in {:.1} s = {achieved_rate:.0} entries/s; {failed} failed requests",
        secs(post_elapsed)
    );
    println!(
        "  lag      max {max} s  p95 {p95} s  mean {mean_lag_seconds:.1} s  over {} samples of /healthz rollup_lag_seconds",
        samples.len()
    );
    std::io::stdout().flush().ok();
    let line = format!(
        "summary engine={:<8} lag max={max} s p95={p95} s (target < {TARGET_LAG_SECONDS} s: {})  posted={achieved_rate:.0}/s",
        engine.name(),
        if met { "met" } else { "NOT met" }
    );
    Ok((met, line))
}
