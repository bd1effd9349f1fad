//! `tally-bench`: measures Tally against plain-database baselines in the same run.
//!
//! Each subcommand starts Tally in-process on a throwaway database, drives it
//! over HTTP the way a client would, and measures a baseline that does the
//! same work with the database alone, so that a figure is always read next to
//! what the hardware can do without Tally. Results go to stdout; progress and
//! diagnostics go to stderr.
//!
//! Subcommands:
//! - `ingest` ([`ingest`]): `POST /v1/entries` in batches against
//!   `psql \copy` (PostgreSQL) and one prepared statement in one transaction
//!   (SQLite).
//! - `rollup` ([`rollup`]): `jobs::rollup::run` over a generated ledger against
//!   one `INSERT … SELECT … GROUP BY … ON CONFLICT DO UPDATE` per table;
//!   `rollup-lag`: `/healthz` lag under steady ingestion with the jobs running.
//! - `quota` ([`quota`]): check latency (in-process and HTTP) against
//!   `SELECT SUM(amount)`, and consume throughput against a counter upsert.
//! - `export` ([`export`]): the `tally export entries|daily` binary on a
//!   generated ledger against `psql \copy (SELECT …) TO` (PostgreSQL) and the
//!   `sqlite3` shell's CSV mode (SQLite): rows/s and peak RSS.
//!
//! Shared pieces (the workload generator in [`workload`], the in-process
//! server and throwaway databases in [`harness`], the engine choice and report
//! helpers here) are independent of any one subcommand; a new measurement is a
//! sibling module and a [`Command`] variant.

pub mod export;
pub mod harness;
pub mod ingest;
pub mod quota;
pub mod rollup;
pub mod workload;

use std::fmt;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// Command line of `tally-bench`.
#[derive(Debug, Parser)]
#[command(
    name = "tally-bench",
    version,
    about = "Benchmarks Tally against plain-database baselines",
    long_about = "Benchmarks Tally against plain-database baselines.\n\n\
                  Each subcommand starts Tally in-process on a throwaway database (a temporary SQLite \
                  file, or a throwaway PostgreSQL cluster tuned for speed: fsync=off, \
                  synchronous_commit=off), measures it over HTTP, measures a baseline doing the same \
                  work with the database alone, and prints both and their ratio."
)]
pub struct Cli {
    /// The benchmark to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Bulk ingestion: POST /v1/entries in batches over several connections.
    Ingest(ingest::IngestArgs),
    /// Folding the ledger into daily and monthly totals, against one
    /// `INSERT … SELECT … GROUP BY … ON CONFLICT DO UPDATE` per table.
    Rollup(rollup::RollupArgs),
    /// `/healthz` rollup lag while entries are posted at a steady rate, with
    /// the scheduled jobs running.
    RollupLag(rollup::LagArgs),
    /// Quota check latency on a large ledger, and consume throughput, against
    /// `SELECT SUM(amount)` and a counter upsert.
    Quota(quota::QuotaArgs),
    /// `tally export entries|daily` as a child process (rows/s, peak RSS),
    /// against the database's own CSV dump of the same columns.
    Export(export::ExportArgs),
}

/// Which engines a benchmark runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EngineChoice {
    /// SQLite only.
    Sqlite,
    /// PostgreSQL only (a throwaway cluster).
    Postgres,
    /// SQLite, then PostgreSQL.
    Both,
}

impl EngineChoice {
    /// The engines to run, in order.
    pub fn engines(self) -> Vec<Engine> {
        match self {
            Self::Sqlite => vec![Engine::Sqlite],
            Self::Postgres => vec![Engine::Postgres],
            Self::Both => vec![Engine::Sqlite, Engine::Postgres],
        }
    }
}

/// A database engine Tally runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// SQLite (embedded).
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

impl Engine {
    /// The engine's name in output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
        }
    }
}

impl fmt::Display for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Flushes the printed results and picks the exit status: 1 when `--check`
/// was given and a target was missed.
pub fn exit_status(check: bool, all_met: bool) -> ExitCode {
    std::io::Write::flush(&mut std::io::stdout()).ok();
    if check && !all_met {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Items per second; 0 for a zero duration.
pub fn rate(count: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds > 0.0 { count as f64 / seconds } else { 0.0 }
}

/// Logs to stderr, filtered by `RUST_LOG` (default: warnings only, so that
/// per-request logging does not weigh on the measurement).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Entry point of the `tally-bench` binary: parses arguments, runs the
/// benchmark on a multi-threaded Tokio runtime, and maps errors to exit code 2
/// (exit code 1 is reserved for `--check` finding a missed target).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("tally-bench: cannot start the async runtime: {err}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("tally-bench: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs the benchmark `cli` names.
///
/// # Errors
///
/// Fails when a database cannot be set up, Tally cannot start, a request does
/// not get the expected answer, or the rows that landed do not match.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Ingest(args) => ingest::run(&args).await,
        Command::Rollup(args) => rollup::run(&args).await,
        Command::RollupLag(args) => rollup::run_lag(&args).await,
        Command::Quota(args) => quota::run(&args).await,
        Command::Export(args) => export::run(&args).await,
    }
}
