//! `tally-bench export`: `tally export entries` and `tally export daily` run as
//! a user runs them, against the database's own CSV dump of the same columns.
//!
//! Per engine:
//!
//! 1. A database created by Tally's migrations gets `--entries` ledger rows,
//!    generated inside the database by one statement ([`SqlLedger`]:
//!    `--accounts` accounts, the built-in resources, `occurred_at` spread over
//!    `--days` days, a metadata JSON object on every `--metadata-every`-th
//!    row). `jobs::rollup::run` then folds every row, so `daily_totals` is
//!    complete and the daily export reads only the folded totals.
//! 2. **Tally**: the `tally` binary (`--tally-bin`, default: the one beside
//!    this executable) as a child process, `tally export entries|daily --from
//!    D --to D -o FILE` with `TALLY_DATABASE_URL` set, covering every row.
//!    Wall time is spawn to exit (process start, migrations check and the
//!    atomic rename included); peak RSS is the child's maximum resident set
//!    from `/usr/bin/time -f %M` (GNU time, `getrusage` of the child), or,
//!    without it, `VmHWM` of `/proc/PID/status` polled every 50 ms.
//! 3. **Baseline**, measured the same way, on the same database:
//!    - PostgreSQL: `psql -c "\copy (SELECT <same columns> … ORDER BY …) TO
//!      'FILE' WITH (FORMAT csv, HEADER)"` (the cluster's own `psql`,
//!      `PGTZ=UTC`);
//!    - SQLite: the `sqlite3` command-line shell, `-csv -header`, `.output
//!      FILE`, the same `SELECT`.
//!
//!    The baseline writes each column in the database's own text form:
//!    amounts in minor units (`37`, where Tally writes `0.37` for
//!    `agent_minutes`), instants as `2026-01-01 12:00:00+00` (PostgreSQL) or
//!    integer microseconds (SQLite) where Tally writes RFC 3339 with `Z`,
//!    and `jsonb`'s own spacing for metadata.
//!
//! Every file's data rows are counted with the `csv` crate and must equal the
//! ledger's rows (entries) or `daily_totals`' rows (daily); its header must
//! be the documented one (Tally) or name the same columns (baseline). Files
//! are deleted after counting. Targets: Tally ≥ [`TARGET_RATIO`] × the
//! baseline's rows/s, and a peak RSS under [`TARGET_PEAK_RSS_MIB`] MiB.

use std::io::{BufRead as _, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::str::FromStr as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use chrono::{DateTime, NaiveDate, Utc};
use clap::Args;
use sqlx::Connection as _;

use super::harness::{
    PG_CLUSTER_SETTINGS, PgScratch, SQLITE_SETTINGS, SqliteScratch, count_rows, fill_ledger_with_metadata,
    pg_database_name,
};
use super::workload::SqlLedger;
use super::{Engine, EngineChoice, rate};
use crate::app::Settings;
use crate::export::ledger::{DAILY_HEADER, ENTRIES_HEADER};
use crate::jobs::rollup::RollupOptions;
use crate::telemetry::Metrics;

/// Target ratio of Tally's export rate to the baseline's.
pub const TARGET_RATIO: f64 = 0.8;
/// Target ceiling of the exporting process's peak resident set, MiB.
pub const TARGET_PEAK_RSS_MIB: u64 = 100;

/// GNU time, used for the child's peak RSS when present.
const GNU_TIME: &str = "/usr/bin/time";

/// Options of `tally-bench export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Ledger rows to generate and export (each engine gets the same rows).
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub entries: u64,
    /// Distinct accounts the rows spread over.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub accounts: u64,
    /// Days `occurred_at` spreads over (ending one minute ago).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3650))]
    pub days: u64,
    /// Every N-th row carries a metadata JSON object of about 100 bytes (0: none).
    #[arg(long, default_value_t = 10)]
    pub metadata_every: u64,
    /// Which engines to measure.
    #[arg(long, value_enum, default_value_t = EngineChoice::Both)]
    pub engine: EngineChoice,
    /// How many times each export (Tally, then baseline) runs; the fastest run
    /// and the largest peak RSS are reported.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10))]
    pub runs: u32,
    /// The `tally` binary to measure (default: `tally` beside this executable,
    /// e.g. `target/release/tally`).
    #[arg(long)]
    pub tally_bin: Option<PathBuf>,
    /// Exit with status 1 when a target is missed.
    #[arg(long)]
    pub check: bool,
}

/// Which export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Entries,
    Daily,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Entries => "entries",
            Self::Daily => "daily",
        }
    }

    fn header(self) -> &'static [&'static str] {
        match self {
            Self::Entries => &ENTRIES_HEADER,
            Self::Daily => &DAILY_HEADER,
        }
    }
}

/// How a process was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RssSource {
    GnuTime,
    Polling,
}

impl RssSource {
    fn describe(self) -> &'static str {
        match self {
            Self::GnuTime => "/usr/bin/time %M (getrusage of the child)",
            Self::Polling => "VmHWM of /proc/PID/status polled every 50 ms (a lower bound)",
        }
    }
}

/// One finished child process.
#[derive(Debug, Clone)]
struct Run {
    elapsed: Duration,
    peak_rss_kib: u64,
    /// User + system CPU time of the process (GNU time only).
    cpu_seconds: Option<f64>,
}

/// One side (Tally or baseline) of one export: best of `--runs`.
#[derive(Debug, Clone)]
struct Side {
    elapsed: Duration,
    peak_rss_kib: u64,
    cpu_seconds: Option<f64>,
    rows: u64,
    file_bytes: u64,
    sample: String,
}

impl Side {
    fn rows_per_sec(&self) -> f64 {
        rate(self.rows, self.elapsed)
    }

    /// Peak RSS in MiB, for printing (one decimal, integer arithmetic).
    fn peak_rss_mib(&self) -> String {
        format!("{}.{}", self.peak_rss_kib / 1024, self.peak_rss_kib % 1024 * 10 / 1024)
    }
}

/// Both sides of one export.
#[derive(Debug, Clone)]
struct KindReport {
    kind: Kind,
    tally: Side,
    baseline: Side,
}

impl KindReport {
    fn ratio(&self) -> f64 {
        let baseline_rows_per_sec = self.baseline.rows_per_sec();
        if baseline_rows_per_sec > 0.0 {
            self.tally.rows_per_sec() / baseline_rows_per_sec
        } else {
            0.0
        }
    }

    fn ratio_met(&self) -> bool {
        self.ratio() >= TARGET_RATIO
    }

    fn rss_met(&self) -> bool {
        self.tally.peak_rss_kib < TARGET_PEAK_RSS_MIB * 1024
    }
}

/// One engine's measurements.
#[derive(Debug, Clone)]
struct EngineReport {
    engine: Engine,
    generate_elapsed: Duration,
    rollup_elapsed: Duration,
    daily_rows: u64,
    baseline_tool: String,
    kinds: Vec<KindReport>,
}

/// The database an engine's exports read, and how to run its baseline.
enum Target {
    Sqlite {
        url: String,
        file: PathBuf,
    },
    Postgres {
        url: String,
        psql: PathBuf,
        socket_dir: PathBuf,
        port: u16,
    },
}

impl Target {
    fn url(&self) -> &str {
        match self {
            Self::Sqlite { url, .. } | Self::Postgres { url, .. } => url,
        }
    }
}

/// The date range every export covers, and the same instants as the baselines need them.
#[derive(Debug, Clone, Copy)]
struct Range {
    from: NaiveDate,
    to: NaiveDate,
}

impl Range {
    fn start(day: NaiveDate) -> DateTime<Utc> {
        day.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc()
    }
}

/// Runs `tally-bench export`.
///
/// # Errors
///
/// Fails when the `tally` binary or a baseline tool is missing, a database
/// cannot be set up, a process fails, or an exported file does not hold the
/// expected rows.
pub async fn run(args: &ExportArgs) -> anyhow::Result<ExitCode> {
    let tally_bin = match &args.tally_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("locating this executable")?
            .with_file_name("tally"),
    };
    ensure!(
        tally_bin.is_file(),
        "no tally binary at {} (build it: cargo build --release --bin tally, or pass --tally-bin)",
        tally_bin.display()
    );
    let rss_source = if Path::new(GNU_TIME).is_file() {
        RssSource::GnuTime
    } else {
        RssSource::Polling
    };
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mut reports = Vec::new();
    for engine in args.engine.engines() {
        let report = run_engine(args, engine, &tally_bin, rss_source)
            .await
            .with_context(|| format!("export benchmark on {engine}"))?;
        print_report(args, cores, rss_source, &tally_bin, &report);
        reports.push(report);
    }
    println!();
    let mut all_met = true;
    for report in &reports {
        let mut line = format!("summary engine={:<8}", report.engine.name());
        for kind in &report.kinds {
            all_met &= kind.ratio_met() && kind.rss_met();
            line.push_str(&format!(
                "  {}: {:.0} rows/s ratio={:.2} (target ≥ {TARGET_RATIO:.2}: {}) peak_rss={} MiB (target < {TARGET_PEAK_RSS_MIB}: {})",
                kind.kind.name(),
                kind.tally.rows_per_sec(),
                kind.ratio(),
                met(kind.ratio_met()),
                kind.tally.peak_rss_mib(),
                met(kind.rss_met()),
            ));
        }
        println!("{line}");
    }
    Ok(super::exit_status(args.check, all_met))
}

fn met(is_met: bool) -> &'static str {
    if is_met { "met" } else { "NOT met" }
}

fn secs(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64()
}

/// The ledger the export reads.
fn ledger(args: &ExportArgs, base_epoch_seconds: i64) -> SqlLedger {
    SqlLedger {
        first: 0,
        count: args.entries,
        accounts: args.accounts,
        account_prefix: "acct-".into(),
        resource: None,
        days: args.days,
        base_epoch_seconds,
        key_prefix: "x-".into(),
    }
}

async fn run_engine(
    args: &ExportArgs,
    engine: Engine,
    tally_bin: &Path,
    rss_source: RssSource,
) -> anyhow::Result<EngineReport> {
    let base_epoch_seconds = Utc::now().timestamp() - 60;
    let base = DateTime::from_timestamp(base_epoch_seconds, 0).context("a valid base time")?;
    let days = i64::try_from(args.days).context("--days")?;
    let range = Range {
        from: (base - chrono::Duration::days(days)).date_naive(),
        to: base.date_naive() + chrono::Duration::days(1),
    };
    let files = tempfile::Builder::new()
        .prefix("tally-bench-export-")
        .tempdir()
        .context("creating a temporary directory")?;
    // Both live until the engine is done; dropping them deletes the database.
    let mut sqlite_scratch = None;
    let mut pg_scratch = None;
    let (target, baseline_tool) = match engine {
        Engine::Sqlite => {
            let tool = tool_version(Command::new("sqlite3").arg("-version"))
                .context("the SQLite baseline needs the sqlite3 shell (Debian: apt-get install sqlite3)")?;
            let scratch = sqlite_scratch.insert(SqliteScratch::new()?);
            let target = Target::Sqlite {
                url: scratch.url("export.db"),
                file: scratch.path("export.db"),
            };
            (target, format!("sqlite3 {tool}"))
        }
        Engine::Postgres => {
            eprintln!("[postgres] starting a throwaway cluster ({PG_CLUSTER_SETTINGS})…");
            let pg = pg_scratch.insert(PgScratch::start().await?);
            let url = pg.create_database().await?;
            let psql = pg.psql();
            let tool = tool_version(Command::new(&psql).arg("--version"))?;
            let target = Target::Postgres {
                url,
                psql,
                socket_dir: pg.cluster().socket_dir().to_owned(),
                port: pg.cluster().port(),
            };
            (target, tool)
        }
    };
    let url = target.url().to_owned();
    drop(open(&url).await?);
    eprintln!(
        "[{engine}] generating {} ledger rows (metadata on every {}th)…",
        args.entries, args.metadata_every
    );
    let generate_elapsed =
        fill_ledger_with_metadata(&url, &ledger(args, base_epoch_seconds), args.metadata_every, true).await?;
    eprintln!(
        "[{engine}] generated in {:.1} s; folding with jobs::rollup::run…",
        secs(generate_elapsed)
    );
    let rollup_elapsed = fold(&url, args.entries).await?;
    settle(&url).await?;
    let daily_rows = count_rows(&url, "daily_totals").await?;
    eprintln!(
        "[{engine}] folded in {:.1} s ({daily_rows} daily rows); exporting {} to {}",
        secs(rollup_elapsed),
        range.from,
        range.to
    );
    let mut kinds = Vec::new();
    for (kind, expected) in [(Kind::Entries, args.entries), (Kind::Daily, daily_rows)] {
        let mut best: Option<(Side, Side)> = None;
        for run in 1..=args.runs {
            if let Some(pg) = &pg_scratch {
                pg.checkpoint().await?;
            }
            let path = files.path().join(format!("tally-{}.csv", kind.name()));
            eprintln!("[{engine}] {} run {run}: tally export {}…", kind.name(), kind.name());
            let mut command = Command::new(tally_bin);
            command
                .args(["export", kind.name(), "--from"])
                .arg(range.from.to_string())
                .arg("--to")
                .arg(range.to.to_string())
                .arg("-o")
                .arg(&path)
                .env("TALLY_DATABASE_URL", &url);
            let measured = measure(command, rss_source).await?;
            let tally = inspect(&measured, &path, kind, true, expected)?;

            if let Some(pg) = &pg_scratch {
                pg.checkpoint().await?;
            }
            let path = files.path().join(format!("baseline-{}.csv", kind.name()));
            eprintln!("[{engine}] {} run {run}: baseline…", kind.name());
            let measured = measure(baseline_command(&target, kind, range, &path)?, rss_source).await?;
            let baseline = inspect(&measured, &path, kind, false, expected)?;
            eprintln!(
                "[{engine}] {} run {run}: tally {:.2} s {} MiB, baseline {:.2} s {} MiB",
                kind.name(),
                secs(tally.elapsed),
                tally.peak_rss_mib(),
                secs(baseline.elapsed),
                baseline.peak_rss_mib()
            );
            best = Some(match best {
                None => (tally, baseline),
                Some((best_tally, best_baseline)) => (better(best_tally, tally), better(best_baseline, baseline)),
            });
        }
        let (tally, baseline) = best.context("at least one run")?;
        kinds.push(KindReport { kind, tally, baseline });
    }
    drop(sqlite_scratch);
    drop(pg_scratch);
    Ok(EngineReport {
        engine,
        generate_elapsed,
        rollup_elapsed,
        daily_rows,
        baseline_tool,
        kinds,
    })
}

async fn open(url: &str) -> anyhow::Result<std::sync::Arc<dyn crate::store::Store>> {
    let settings = Settings {
        database_url: url.to_owned(),
        ..Settings::default()
    };
    Ok(settings.open_store().await?.0)
}

/// Folds the whole ledger with Tally's rollup; returns how long it took.
async fn fold(url: &str, entries: u64) -> anyhow::Result<Duration> {
    let store = open(url).await?;
    let start = Instant::now();
    let report = crate::jobs::rollup::run(store.as_ref(), &RollupOptions::default(), &Metrics::default()).await?;
    let elapsed = start.elapsed();
    ensure!(
        report.entries == entries,
        "the rollup folded {} rows, expected {entries}",
        report.entries
    );
    Ok(elapsed)
}

/// Leaves the database as a long-running one would be: SQLite's WAL
/// checkpointed into the main file; PostgreSQL vacuumed and analyzed (the
/// rollup's upserts leave dead tuples in the totals tables).
async fn settle(url: &str) -> anyhow::Result<()> {
    if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await?;
        sqlx::raw_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&mut conn)
            .await?;
        conn.close().await.ok();
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        // One statement each: VACUUM cannot run inside the implicit
        // transaction of a multi-statement string.
        for table in ["entries", "daily_totals", "monthly_totals"] {
            sqlx::raw_sql(&format!("VACUUM ANALYZE {table}"))
                .execute(&mut conn)
                .await?;
        }
        conn.close().await.ok();
    }
    Ok(())
}

/// The first line a tool prints for `--version`.
fn tool_version(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {:?}", command.get_program()))?;
    ensure!(output.status.success(), "{:?} failed", command.get_program());
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" "))
}

/// The columns and source of the baseline's `SELECT`, for one engine.
fn baseline_select(target: &Target, kind: Kind, range: Range) -> String {
    let (from, to) = (Range::start(range.from), Range::start(range.to));
    match (kind, target) {
        (Kind::Entries, Target::Sqlite { .. }) => format!(
            "SELECT id, account, resource, amount, occurred_at, recorded_at, idempotency_key, source, reverses, \
             metadata FROM entries WHERE occurred_at >= {} AND occurred_at < {} ORDER BY id",
            from.timestamp_micros(),
            to.timestamp_micros()
        ),
        (Kind::Entries, Target::Postgres { .. }) => format!(
            "SELECT id, account, resource, amount, occurred_at, recorded_at, idempotency_key, source, reverses, \
             metadata FROM entries WHERE occurred_at >= '{}' AND occurred_at < '{}' ORDER BY id",
            from.to_rfc3339(),
            to.to_rfc3339()
        ),
        (Kind::Daily, _) => format!(
            "SELECT account, resource, day, amount, entries FROM daily_totals \
             WHERE day >= '{}' AND day < '{}' ORDER BY account, resource, day",
            range.from, range.to
        ),
    }
}

/// `path` as a single-quoted SQL / psql literal.
fn quoted(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "''"))
}

/// The baseline's command line: `psql … -c "\copy (SELECT …) TO 'FILE' …"`
/// or `sqlite3 -csv -header -cmd ".output 'FILE'" DB "SELECT …"`.
fn baseline_command(target: &Target, kind: Kind, range: Range, path: &Path) -> anyhow::Result<Command> {
    let select = baseline_select(target, kind, range);
    match target {
        Target::Sqlite { file, .. } => {
            let mut command = Command::new("sqlite3");
            command
                .args(["-batch", "-bail", "-csv", "-header", "-cmd"])
                .arg(format!(".output {}", quoted(path)))
                .arg(file)
                .arg(select);
            Ok(command)
        }
        Target::Postgres {
            url,
            psql,
            socket_dir,
            port,
        } => {
            let mut command = Command::new(psql);
            command
                .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
                .arg(socket_dir)
                .arg("-p")
                .arg(port.to_string())
                .args(["-U", "tally", "-d", pg_database_name(url)?, "-c"])
                .arg(format!(
                    "\\copy ({select}) TO {} WITH (FORMAT csv, HEADER)",
                    quoted(path)
                ))
                .env("PGTZ", "UTC");
            Ok(command)
        }
    }
}

/// Runs `command` to completion with stdin and stdout closed, and measures
/// its wall time and peak RSS. Fails if it exits unsuccessfully.
async fn measure(command: Command, rss_source: RssSource) -> anyhow::Result<Run> {
    tokio::task::spawn_blocking(move || measure_blocking(command, rss_source))
        .await
        .context("the measuring task panicked")?
}

fn measure_blocking(command: Command, rss_source: RssSource) -> anyhow::Result<Run> {
    let shown = format!(
        "{:?} {:?}",
        command.get_program(),
        command.get_args().collect::<Vec<_>>()
    );
    match rss_source {
        RssSource::GnuTime => {
            let rss_file = tempfile::NamedTempFile::new().context("creating a temporary file")?;
            let mut timed = Command::new(GNU_TIME);
            timed.arg("-f").arg("%M %U %S").arg("-o").arg(rss_file.path());
            timed.arg(command.get_program()).args(command.get_args());
            for (key, value) in command.get_envs() {
                match value {
                    Some(value) => timed.env(key, value),
                    None => timed.env_remove(key),
                };
            }
            let start = Instant::now();
            let output = timed
                .stdin(Stdio::null())
                .output()
                .with_context(|| format!("running {shown}"))?;
            let elapsed = start.elapsed();
            if !output.status.success() {
                bail!(
                    "{shown} failed ({}): {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
            let report = std::fs::read_to_string(rss_file.path()).context("reading /usr/bin/time's report")?;
            // The last line is "MAXRSS_KIB USER_SECONDS SYSTEM_SECONDS".
            let fields: Vec<&str> = report.lines().last().unwrap_or_default().split_whitespace().collect();
            let (Some(Ok(peak_rss_kib)), Some(Ok(user_seconds)), Some(Ok(system_seconds))) = (
                fields.first().map(|f| u64::from_str(f)),
                fields.get(1).map(|seconds| f64::from_str(seconds)),
                fields.get(2).map(|seconds| f64::from_str(seconds)),
            ) else {
                bail!("unexpected /usr/bin/time report: {report:?}");
            };
            Ok(Run {
                elapsed,
                peak_rss_kib,
                cpu_seconds: Some(user_seconds + system_seconds),
            })
        }
        RssSource::Polling => {
            let mut command = command;
            let start = Instant::now();
            let mut child = command
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("running {shown}"))?;
            let mut stderr = child.stderr.take();
            let drain = std::thread::spawn(move || {
                let mut text = String::new();
                if let Some(stderr) = stderr.as_mut() {
                    stderr.read_to_string(&mut text).ok();
                }
                text
            });
            let status_path = PathBuf::from(format!("/proc/{}/status", child.id()));
            let mut peak_rss_kib = 0;
            let status = loop {
                if let Some(kib) = vm_hwm_kib(&status_path) {
                    peak_rss_kib = peak_rss_kib.max(kib);
                }
                if let Some(status) = child.try_wait()? {
                    break status;
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            let elapsed = start.elapsed();
            let stderr = drain.join().unwrap_or_default();
            if !status.success() {
                bail!("{shown} failed ({status}): {}", stderr.trim());
            }
            Ok(Run {
                elapsed,
                peak_rss_kib,
                cpu_seconds: None,
            })
        }
    }
}

/// `VmHWM` (peak resident set, KiB) from a `/proc/PID/status` file.
fn vm_hwm_kib(status_path: &Path) -> Option<u64> {
    let status = std::fs::read_to_string(status_path).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| u64::from_str(kib).ok())
}

/// Counts the data rows of the CSV file at `path` with the `csv` crate,
/// checks its header and row count, keeps its first data line as a sample,
/// and deletes it.
fn inspect(run: &Run, path: &Path, kind: Kind, is_tally: bool, expected_rows: u64) -> anyhow::Result<Side> {
    let file_bytes = std::fs::metadata(path)
        .with_context(|| format!("{} was not written", path.display()))?
        .len();
    let sample = {
        let mut lines = std::io::BufReader::new(std::fs::File::open(path)?).lines();
        lines.nth(1).transpose()?.unwrap_or_default()
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .buffer_capacity(1 << 20)
        .from_path(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let header: Vec<String> = reader.headers()?.iter().map(str::to_owned).collect();
    ensure!(
        header == kind.header(),
        "{} export header of {}: {header:?}, expected {:?}",
        kind.name(),
        if is_tally { "Tally" } else { "the baseline" },
        kind.header()
    );
    let mut record = csv::ByteRecord::new();
    let mut rows = 0_u64;
    while reader.read_byte_record(&mut record)? {
        ensure!(
            record.len() == header.len(),
            "row {} of {} has {} fields",
            rows + 1,
            path.display(),
            record.len()
        );
        rows += 1;
    }
    ensure!(
        rows == expected_rows,
        "the {} {} export holds {rows} rows, expected {expected_rows}",
        if is_tally { "Tally" } else { "baseline" },
        kind.name()
    );
    std::fs::remove_file(path).with_context(|| format!("deleting {}", path.display()))?;
    Ok(Side {
        elapsed: run.elapsed,
        peak_rss_kib: run.peak_rss_kib,
        cpu_seconds: run.cpu_seconds,
        rows,
        file_bytes,
        sample,
    })
}

/// The faster of two runs of the same side, with the larger peak RSS of both.
fn better(a: Side, b: Side) -> Side {
    let peak_rss_kib = a.peak_rss_kib.max(b.peak_rss_kib);
    let fastest = if b.elapsed < a.elapsed { b } else { a };
    Side {
        peak_rss_kib,
        ..fastest
    }
}

fn print_report(args: &ExportArgs, cores: usize, rss_source: RssSource, tally_bin: &Path, report: &EngineReport) {
    let settings = match report.engine {
        Engine::Sqlite => format!("{SQLITE_SETTINGS} (Tally's pragmas; the sqlite3 shell's defaults)"),
        Engine::Postgres => format!("throwaway cluster, {PG_CLUSTER_SETTINGS}"),
    };
    let baseline_method = match report.engine {
        Engine::Sqlite => "sqlite3 -csv -header, .output FILE, SELECT … ORDER BY …",
        Engine::Postgres => "psql \\copy (SELECT … ORDER BY …) TO FILE WITH (FORMAT csv, HEADER)",
    };
    println!();
    println!(
        "export  engine={}  entries={} accounts={} days={} metadata_every={} runs={} cores={cores}",
        report.engine, args.entries, args.accounts, args.days, args.metadata_every, args.runs
    );
    println!("  settings  {settings}");
    println!(
        "  tools     tally={}  baseline={}  rss={}",
        tally_bin.display(),
        report.baseline_tool,
        rss_source.describe()
    );
    println!(
        "  prepared  {} rows generated in SQL in {:.1} s, folded by jobs::rollup::run in {:.1} s ({} daily rows)",
        args.entries,
        secs(report.generate_elapsed),
        secs(report.rollup_elapsed),
        report.daily_rows
    );
    for kind in &report.kinds {
        let name = kind.kind.name();
        for (label, side, method) in [
            ("tally", &kind.tally, format!("tally export {name} -o FILE")),
            ("baseline", &kind.baseline, baseline_method.to_owned()),
        ] {
            let cpu = side
                .cpu_seconds
                .map_or_else(|| "n/a".to_owned(), |cpu_seconds| format!("{cpu_seconds:.2} s"));
            println!(
                "  {name:<8} {label:<9} {:>9.0} rows/s  ({:>6.2} s, cpu {cpu}, {} rows, {} MiB file)  \
                 peak RSS {:>6} MiB  [{method}]",
                side.rows_per_sec(),
                secs(side.elapsed),
                side.rows,
                side.file_bytes / (1024 * 1024),
                side.peak_rss_mib(),
            );
        }
        println!("  {name:<8} ratio     {:>9.2} × baseline", kind.ratio());
    }
    for kind in &report.kinds {
        println!("  sample   {:<8} tally:    {}", kind.kind.name(), kind.tally.sample);
        println!("  sample   {:<8} baseline: {}", kind.kind.name(), kind.baseline.sample);
    }
    std::io::stdout().flush().ok();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range() -> Range {
        Range {
            from: NaiveDate::from_ymd_opt(2026, 9, 1).expect("a date"),
            to: NaiveDate::from_ymd_opt(2026, 10, 1).expect("a date"),
        }
    }

    /// The column list between `SELECT` and `FROM`.
    fn columns(select: &str) -> Vec<String> {
        let list = select
            .strip_prefix("SELECT ")
            .and_then(|rest| rest.split_once(" FROM "))
            .map(|(list, _)| list)
            .expect("SELECT … FROM");
        list.split(", ").map(str::to_owned).collect()
    }

    #[test]
    fn baseline_selects_the_exported_columns_in_order() {
        let sqlite = Target::Sqlite {
            url: "sqlite:///x.db".into(),
            file: PathBuf::from("/x.db"),
        };
        let postgres = Target::Postgres {
            url: "postgres://tally@localhost/db?host=/tmp&port=5432".into(),
            psql: PathBuf::from("psql"),
            socket_dir: PathBuf::from("/tmp"),
            port: 5432,
        };
        for target in [&sqlite, &postgres] {
            for kind in [Kind::Entries, Kind::Daily] {
                let select = baseline_select(target, kind, range());
                assert_eq!(columns(&select), kind.header(), "{select}");
            }
        }
        let select = baseline_select(&sqlite, Kind::Entries, range());
        assert!(select.contains("occurred_at >= 1788220800000000 AND occurred_at < 1790812800000000"));
        let select = baseline_select(&postgres, Kind::Entries, range());
        assert!(select.contains("occurred_at >= '2026-09-01T00:00:00+00:00'"));
    }

    #[test]
    fn psql_command_quotes_the_file() {
        let postgres = Target::Postgres {
            url: "postgres://tally@localhost/db?host=/tmp&port=5432".into(),
            psql: PathBuf::from("psql"),
            socket_dir: PathBuf::from("/tmp"),
            port: 5432,
        };
        let command = baseline_command(&postgres, Kind::Daily, range(), Path::new("/tmp/it's.csv")).expect("a command");
        let args: Vec<String> = command.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        let copy = args.last().expect("the \\copy argument");
        assert!(copy.starts_with("\\copy (SELECT account, resource, day, amount, entries FROM daily_totals"));
        assert!(
            copy.ends_with("TO '/tmp/it''s.csv' WITH (FORMAT csv, HEADER)"),
            "{copy}"
        );
        assert!(args.windows(2).any(|w| w == ["-d", "db"]));
    }

    #[test]
    fn peak_rss_is_read_from_proc() {
        let kib = vm_hwm_kib(Path::new("/proc/self/status")).expect("VmHWM on Linux");
        assert!(kib > 0);
    }

    #[test]
    fn the_faster_run_keeps_the_larger_peak() {
        let side = |seconds, kib| Side {
            elapsed: Duration::from_secs(seconds),
            peak_rss_kib: kib,
            cpu_seconds: None,
            rows: 10,
            file_bytes: 100,
            sample: String::new(),
        };
        let best = better(side(3, 10), side(2, 5));
        assert_eq!((best.elapsed, best.peak_rss_kib), (Duration::from_secs(2), 10));
    }
}
