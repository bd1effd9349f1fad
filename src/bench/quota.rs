//! `tally-bench quota`: the latency of a quota check on a large ledger, and
//! the throughput of `consume`, each beside a baseline measured in the same run.
//!
//! **Check** (`--part check` or `both`), per engine and per ledger size
//! (`--small-rows`, then `--rows`):
//!
//! 1. A database created by Tally's migrations gets that many ledger rows for
//!    one account (`quota-hot0`, resource `storage_bytes`, whose window is
//!    `total` on every built-in plan, so every row counts), generated inside
//!    the database ([`SqlLedger`]); Tally's rollup folds them all; then
//!    `--tail` more rows are inserted and left unfolded.
//! 2. **Tally**, `--iterations` checks of 1 unit each, one after the other:
//!    in-process (`Quotas::check` on a store opened on the same database) and
//!    over HTTP (`POST /v1/quota/check`, one keep-alive connection). Every
//!    answer's `used` must equal `SUM(amount)` over the account's ledger.
//! 3. **Baseline**: an index on `entries (account, resource, occurred_at)` is
//!    added, then `SELECT SUM(amount) FROM entries WHERE account = ? AND
//!    resource = ?` runs on a direct connection, repeated until
//!    `--iterations` or `--baseline-seconds` is reached (at least 3 times).
//!
//! **Consume** (`--part consume` or `both`), per engine, and on PostgreSQL per
//! `--durability` (a cluster with fsync off as the tests run, then one with
//! PostgreSQL's durable defaults): Tally with its scheduled jobs (the rollup
//! every 10 s, as `tally serve` runs), every account on plan `scale`
//! (`llm_tokens` unlimited, no rate limit; the assignments are inserted in
//! SQL). For `--consume-seconds` each, spread over `--accounts` accounts,
//! then all on one account, and all of it once per count of concurrent
//! callers in `--clients` (default 16, then 64: Tally decides the consumes
//! waiting at one instant in one call, so its rate grows with the callers
//! where the counter's does not, and one count alone would hide that):
//!
//! 1. **Tally in-process** (the target's comparison: the same kind of
//!    connections as the baseline): that many tasks each calling
//!    `Quotas::consume` (what the HTTP handler calls) of 1 `llm_tokens` with a
//!    unique key, one after the other, on a store opened on the database.
//! 2. **Tally over HTTP**, for information: that many HTTP clients posting
//!    `POST /v1/quota/consume` the same way.
//! 3. **Baseline**: a counter upsert (`INSERT … ON CONFLICT DO UPDATE SET
//!    count = count + 1`, on PostgreSQL wrapped in a SQL function
//!    `bump(account, resource)` called as `SELECT bump($1, $2)`) from as many
//!    concurrent connections, same keys pattern, same duration. It checks
//!    nothing. On SQLite the baseline is the same upsert through one writer
//!    connection (Tally's own discipline) on a separate file with Tally's
//!    pragmas.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::{Args, ValueEnum};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use sqlx::Connection as _;
use tokio::task::JoinSet;

use super::harness::{PG_CLUSTER_SETTINGS, PgScratch, RunningTally, SQLITE_SETTINGS, SqliteScratch, fill_ledger};
use super::workload::SqlLedger;
use super::{Engine, EngineChoice, rate};
use crate::app::Settings;
use crate::domain::{AccountId, Amount, IdempotencyKey, NewEntry, ResourceName};
use crate::jobs::rollup::RollupOptions;
use crate::store::Store;
use crate::telemetry::Metrics;
use crate::testing::pg_cluster::Durability;
use crate::usage::quota::ConsumeOutcome;
use crate::usage::quota::Quotas;
use chrono::SubsecRound as _;

/// Target p99 of an in-process check.
pub const TARGET_P99_IN_PROCESS: Duration = Duration::from_millis(1);
/// Target p99 of a check over HTTP.
pub const TARGET_P99_HTTP: Duration = Duration::from_millis(2);
/// Target ratio of consume throughput to the counter baseline's.
pub const TARGET_CONSUME_RATIO: f64 = 1.0;

/// The account the check part measures.
const CHECK_ACCOUNT: &str = "quota-hot0";
/// The resource the check part measures (window `total`).
const CHECK_RESOURCE: &str = "storage_bytes";
/// The resource consumed (unlimited on plan `scale`, no rate limit).
const CONSUME_RESOURCE: &str = "llm_tokens";

/// Which parts of `tally-bench quota` run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Part {
    /// Check latency only.
    Check,
    /// Consume throughput only.
    Consume,
    /// Both.
    Both,
}

/// Which PostgreSQL clusters the consume part runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DurabilityChoice {
    /// fsync, synchronous_commit and full_page_writes off.
    Fast,
    /// PostgreSQL's defaults.
    Durable,
    /// Fast, then durable.
    Both,
}

impl DurabilityChoice {
    fn durabilities(self) -> Vec<Durability> {
        match self {
            Self::Fast => vec![Durability::Fast],
            Self::Durable => vec![Durability::Durable],
            Self::Both => vec![Durability::Fast, Durability::Durable],
        }
    }
}

/// Options of `tally-bench quota`.
#[derive(Debug, Clone, Args)]
pub struct QuotaArgs {
    /// Folded ledger rows of the checked account (the large ledger).
    #[arg(long, default_value_t = 10_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub rows: u64,
    /// Folded ledger rows of the checked account (the small ledger); 0 skips it.
    #[arg(long, default_value_t = 100_000)]
    pub small_rows: u64,
    /// Unfolded rows inserted after the rollup.
    #[arg(long, default_value_t = 10_000)]
    pub tail: u64,
    /// Checks per measurement (in-process, HTTP, baseline at most).
    #[arg(long, default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(10..))]
    pub iterations: u64,
    /// The baseline stops after this many seconds (after at least 3 queries).
    #[arg(long, default_value_t = 20)]
    pub baseline_seconds: u64,
    /// Concurrent consume callers (and baseline connections), one
    /// measurement per count: group commit gains with concurrency, a
    /// per-event counter does not, so the ratio depends on it. At most 256:
    /// the baseline opens that many connections, and the throwaway cluster
    /// allows 300 (Tally's pool takes 16 more).
    #[arg(long, value_delimiter = ',', default_values_t = [16, 64],
          value_parser = clap::value_parser!(u64).range(1..=256))]
    pub clients: Vec<u64>,
    /// Accounts the spread consume case cycles through.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub accounts: u64,
    /// Seconds each consume measurement runs.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    pub consume_seconds: u64,
    /// Which parts run.
    #[arg(long, value_enum, default_value_t = Part::Both)]
    pub part: Part,
    /// Which engines to measure.
    #[arg(long, value_enum, default_value_t = EngineChoice::Both)]
    pub engine: EngineChoice,
    /// PostgreSQL clusters the consume part runs on: `fast` (fsync off, as the
    /// tests run), `durable` (PostgreSQL's defaults: every commit flushed), or
    /// both, one after the other.
    #[arg(long, value_enum, default_value_t = DurabilityChoice::Both)]
    pub durability: DurabilityChoice,
    /// Consumes carry `occurred_at` (the caller's now), as a service that
    /// stamps its own events sends them. Such a consume is also held to the
    /// limit in force when it is answered, which on PostgreSQL costs a second
    /// plan and override lookup in its group: this measures that.
    #[arg(long)]
    pub dated: bool,
    /// Exit with status 1 when a target is missed.
    #[arg(long)]
    pub check: bool,
}

/// Latency percentiles of a sorted sample.
#[derive(Debug, Clone, Copy)]
struct Latencies {
    count: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Latencies {
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort_unstable();
        let at = |percent: usize| -> Duration {
            let index = (samples.len() * percent).div_ceil(100).saturating_sub(1);
            samples.get(index).copied().unwrap_or_default()
        };
        Self {
            count: samples.len(),
            p50: at(50),
            p99: at(99),
            max: samples.last().copied().unwrap_or_default(),
        }
    }

    fn line(&self) -> String {
        format!(
            "p50 {:>9.3} ms  p99 {:>9.3} ms  max {:>9.3} ms  (n={})",
            ms(self.p50),
            ms(self.p99),
            ms(self.max),
            self.count
        )
    }
}

fn ms(latency: Duration) -> f64 {
    latency.as_secs_f64() * 1000.0
}

/// Runs `tally-bench quota`.
///
/// # Errors
///
/// Fails when a database or Tally cannot be started, an answer is not what
/// the ledger says, or a request fails.
pub async fn run(args: &QuotaArgs) -> anyhow::Result<ExitCode> {
    let mut summary = Vec::new();
    let mut all_met = true;
    for engine in args.engine.engines() {
        if args.part != Part::Consume {
            let mut sizes = vec![args.small_rows, args.rows];
            sizes.retain(|&n| n > 0);
            for rows in sizes {
                let (met, line) = check_on(args, engine, rows)
                    .await
                    .with_context(|| format!("quota check benchmark on {engine} ({rows} rows)"))?;
                all_met &= met;
                summary.push(line);
            }
        }
        if args.part != Part::Check {
            let durabilities = match engine {
                Engine::Sqlite => vec![Durability::Fast],
                Engine::Postgres => args.durability.durabilities(),
            };
            for durability in durabilities {
                let (met, lines) = consume_on(args, engine, durability)
                    .await
                    .with_context(|| format!("quota consume benchmark on {engine}"))?;
                all_met &= met;
                summary.extend(lines);
            }
        }
    }
    println!();
    for line in summary {
        println!("{line}");
    }
    Ok(super::exit_status(args.check, all_met))
}

async fn open(url: &str) -> anyhow::Result<(Arc<dyn Store>, Arc<crate::domain::Catalog>)> {
    let settings = Settings {
        database_url: url.to_owned(),
        ..Settings::default()
    };
    settings.open_store().await
}

/// How the database was set up, for reports (`durability`: PostgreSQL only).
fn settings_of(engine: Engine, durability: Durability) -> String {
    match engine {
        Engine::Sqlite => format!("{SQLITE_SETTINGS} (Tally and baseline alike)"),
        Engine::Postgres => format!(
            "throwaway cluster, {} (Tally and baseline alike)",
            durability.settings()
        ),
    }
}

/// Either engine's direct connection, for the baselines.
enum Direct {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::PgConnection),
}

impl Direct {
    async fn connect(url: &str, sqlite: Option<&SqliteScratch>) -> anyhow::Result<Self> {
        Ok(match sqlite {
            Some(scratch) => Self::Sqlite(scratch.connect("quota.db").await?),
            None => Self::Postgres(sqlx::PgConnection::connect(url).await?),
        })
    }

    async fn execute(&mut self, sql: &str) -> anyhow::Result<()> {
        match self {
            Self::Sqlite(conn) => sqlx::raw_sql(sql).execute(conn).await.map(drop)?,
            Self::Postgres(conn) => sqlx::raw_sql(sql).execute(conn).await.map(drop)?,
        }
        Ok(())
    }

    /// `SELECT SUM(amount)` of the account's resource over the whole ledger.
    async fn sum(&mut self) -> anyhow::Result<i64> {
        Ok(match self {
            Self::Sqlite(conn) => {
                sqlx::query_scalar("SELECT COALESCE(SUM(amount), 0) FROM entries WHERE account = ?1 AND resource = ?2")
                    .bind(CHECK_ACCOUNT)
                    .bind(CHECK_RESOURCE)
                    .fetch_one(conn)
                    .await?
            }
            Self::Postgres(conn) => {
                sqlx::query_scalar(
                    "SELECT COALESCE(SUM(amount), 0)::bigint FROM entries WHERE account = $1 AND resource = $2",
                )
                .bind(CHECK_ACCOUNT)
                .bind(CHECK_RESOURCE)
                .fetch_one(conn)
                .await?
            }
        })
    }

    async fn close(self) {
        match self {
            Self::Sqlite(conn) => conn.close().await.ok(),
            Self::Postgres(conn) => conn.close().await.ok(),
        };
    }
}

/// Times one in-process check (of 1 unit, now) and makes sure it answered
/// `expected` (outside the timed span).
async fn timed_check(
    quotas: &Quotas<'_>,
    account: &AccountId,
    resource: &ResourceName,
    one: Amount,
    expected: i64,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let status = quotas.check(account, resource, one, chrono::Utc::now()).await?;
    let elapsed = start.elapsed();
    ensure!(
        status.used == expected.to_string(),
        "check said used={}, the ledger sums to {expected}",
        status.used
    );
    Ok(elapsed)
}

/// The check part on one engine and ledger size; returns (targets met, summary line).
async fn check_on(args: &QuotaArgs, engine: Engine, rows: u64) -> anyhow::Result<(bool, String)> {
    let sqlite;
    let pg;
    let (url, scratch) = match engine {
        Engine::Sqlite => {
            sqlite = SqliteScratch::new()?;
            (sqlite.url("quota.db"), Some(&sqlite))
        }
        Engine::Postgres => {
            eprintln!("[postgres] starting a throwaway cluster ({PG_CLUSTER_SETTINGS})…");
            pg = PgScratch::start().await?;
            (pg.create_database().await?, None)
        }
    };
    let (store, catalog) = open(&url).await?;
    let base_epoch_seconds = chrono::Utc::now().timestamp() - 120;
    let ledger = SqlLedger {
        first: 0,
        count: rows,
        accounts: 1,
        account_prefix: "quota-hot".into(),
        resource: Some(CHECK_RESOURCE),
        days: 60,
        base_epoch_seconds,
        key_prefix: "q-".into(),
    };
    eprintln!("[{engine}] generating {rows} ledger rows for {CHECK_ACCOUNT} / {CHECK_RESOURCE}…");
    let generated = fill_ledger(&url, &ledger, true).await?;
    eprintln!(
        "[{engine}] generated in {:.1} s; folding them…",
        generated.as_secs_f64()
    );
    let folded = crate::jobs::rollup::run(store.as_ref(), &RollupOptions::default(), &Metrics::default()).await?;
    ensure!(
        folded.entries == rows,
        "the rollup folded {} of {rows} rows",
        folded.entries
    );
    if args.tail > 0 {
        let tail = SqlLedger {
            first: rows,
            count: args.tail,
            ..ledger
        };
        fill_ledger(&url, &tail, false).await?;
    }
    let lag = store.oldest_unfolded().await?;
    ensure!(args.tail == 0 || lag.is_some(), "the tail was folded");

    let account = AccountId::parse(CHECK_ACCOUNT).map_err(anyhow::Error::msg)?;
    let (resource, spec) = catalog.resource(CHECK_RESOURCE)?;
    let resource = resource.clone();
    let one = Amount::from_minor(1, spec.decimals);
    let quotas = Quotas {
        store: store.as_ref(),
        catalog: &catalog,
    };

    // The answer every check must give.
    let mut direct = Direct::connect(&url, scratch).await?;
    let expected = direct.sum().await?;

    eprintln!("[{engine}] Tally in-process: {} checks…", args.iterations);
    for _ in 0..args.iterations.min(200) {
        quotas.check(&account, &resource, one, chrono::Utc::now()).await?;
    }
    let mut samples = Vec::new();
    for _ in 0..args.iterations {
        samples.push(timed_check(&quotas, &account, &resource, one, expected).await?);
    }
    let in_process = Latencies::of(samples);

    // The samples above hit the settled sums (src/store/settled.rs): after
    // the warm-up each reads only rows above its watermark, and nothing is
    // posted meanwhile. Two more views: cold, the first check of a period in
    // a process (or after its watermark was evicted), which sums the folded
    // totals and the whole unfolded tail; and warm while posting, one new
    // entry (untimed) before each check.
    let cold_checks = args.iterations.min(200);
    eprintln!("[{engine}] Tally in-process, cold: {cold_checks} checks, each after forgetting the settled sums…");
    let mut samples = Vec::new();
    for _ in 0..cold_checks {
        store.forget_settled_sums();
        samples.push(timed_check(&quotas, &account, &resource, one, expected).await?);
    }
    let cold = Latencies::of(samples);
    let posting_checks = args.iterations.min(500);
    eprintln!("[{engine}] Tally in-process, warm while posting: {posting_checks} checks, one new entry before each…");
    let mut samples = Vec::new();
    let mut moving = expected;
    for i in 0..posting_checks {
        let entry = NewEntry {
            account: account.clone(),
            resource: resource.clone(),
            amount: one,
            idempotency_key: IdempotencyKey::parse(&format!("bench-posting-{i}")).map_err(anyhow::Error::msg)?,
            occurred_at: chrono::Utc::now().trunc_subsecs(6),
            occurred_at_given: false,
            source: None,
            metadata: None,
            reverses: None,
        };
        store.insert_entries(std::slice::from_ref(&entry)).await?;
        moving += 1;
        samples.push(timed_check(&quotas, &account, &resource, one, moving).await?);
    }
    let posting = Latencies::of(samples);
    // From here on every answer (HTTP, baseline) includes the posted rows.
    let expected = moving;

    eprintln!("[{engine}] Tally over HTTP: {} checks…", args.iterations);
    let tally = RunningTally::start(&url).await?;
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(1)
        .build()?;
    let check_url = tally.url("/v1/quota/check");
    let auth = format!("Bearer {}", tally.admin_key());
    let body = serde_json::to_vec(&serde_json::json!({
        "account": CHECK_ACCOUNT, "resource": CHECK_RESOURCE, "amount": "1"
    }))?;
    let http_check = || async {
        let response = client
            .post(&check_url)
            .header(AUTHORIZATION, &auth)
            .header(CONTENT_TYPE, "application/json")
            .body(body.clone())
            .send()
            .await?;
        let status = response.status();
        let bytes = response.bytes().await?;
        if !status.is_success() {
            bail!("POST /v1/quota/check: {status}: {}", String::from_utf8_lossy(&bytes));
        }
        anyhow::Ok(bytes)
    };
    for _ in 0..args.iterations.min(200) {
        http_check().await?;
    }
    let mut samples = Vec::new();
    for _ in 0..args.iterations {
        let start = Instant::now();
        let bytes = http_check().await?;
        samples.push(start.elapsed());
        // Every answer, outside the timed span.
        let answer: serde_json::Value = serde_json::from_slice(&bytes)?;
        ensure!(
            answer["used"] == expected.to_string().as_str(),
            "HTTP check said {answer}, the ledger sums to {expected}"
        );
    }
    let http = Latencies::of(samples);
    tally.stop().await?;
    drop(store);

    eprintln!("[{engine}] baseline: CREATE INDEX ON entries (account, resource, occurred_at)…");
    let start = Instant::now();
    direct
        .execute("CREATE INDEX bench_entries_account_resource_time ON entries (account, resource, occurred_at)")
        .await?;
    if engine == Engine::Postgres {
        direct.execute("ANALYZE entries").await?;
    }
    let index_elapsed = start.elapsed();
    eprintln!("[{engine}] baseline: SELECT SUM(amount) …");
    let mut samples = Vec::new();
    let started = Instant::now();
    while (samples.len() as u64) < args.iterations
        && (samples.len() < 3 || started.elapsed() < Duration::from_secs(args.baseline_seconds))
    {
        let start = Instant::now();
        let sum = direct.sum().await?;
        samples.push(start.elapsed());
        ensure!(sum == expected, "the baseline summed {sum}, expected {expected}");
    }
    direct.close().await;
    let baseline = Latencies::of(samples);

    let ledger_rows = rows + args.tail;
    println!();
    println!(
        "quota check  engine={engine}  account={CHECK_ACCOUNT} resource={CHECK_RESOURCE} (window total)  \
         folded={rows} tail={} (ledger {ledger_rows} rows)",
        args.tail
    );
    println!("  settings    {}", settings_of(engine, Durability::Fast));
    println!("  answer      used={expected} (every check and the baseline agree)");
    println!(
        "  in-process  {}  [Quotas::check, warm: settled sums known]",
        in_process.line()
    );
    println!(
        "  cold        {}  [Quotas::check after forgetting the settled sums: folded totals + the whole tail]",
        cold.line()
    );
    println!(
        "  posting     {}  [Quotas::check, warm, one entry posted before each]",
        posting.line()
    );
    println!(
        "  http        {}  [POST /v1/quota/check, one keep-alive connection]",
        http.line()
    );
    println!(
        "  baseline    {}  [SELECT SUM(amount) … with an index on (account, resource, occurred_at); index built in {:.1} s]",
        baseline.line(),
        index_elapsed.as_secs_f64()
    );
    println!(
        "  ratio       baseline p50 / Tally in-process p50 = {:.0}×",
        ms(baseline.p50) / ms(in_process.p50).max(1e-9)
    );
    std::io::stdout().flush().ok();
    let in_met = in_process.p99 < TARGET_P99_IN_PROCESS;
    let http_met = http.p99 < TARGET_P99_HTTP;
    let posting_met = posting.p99 < TARGET_P99_IN_PROCESS;
    let cold_met = cold.p99 < TARGET_P99_IN_PROCESS;
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    let line = format!(
        "summary engine={:<8} check rows={ledger_rows:<9} in-process p99={:.3} ms (target < 1 ms: {})  \
         http p99={:.3} ms (target < 2 ms: {})  while posting p99={:.3} ms ({})  cold p99={:.3} ms ({})  \
         baseline p50={:.3} ms",
        engine.name(),
        ms(in_process.p99),
        verdict(in_met),
        ms(http.p99),
        verdict(http_met),
        ms(posting.p99),
        verdict(posting_met),
        ms(cold.p99),
        verdict(cold_met),
        ms(baseline.p50),
    );
    Ok((in_met && http_met && posting_met && cold_met, line))
}

/// One consume-throughput measurement.
#[derive(Debug, Clone, Copy)]
struct Throughput {
    done: u64,
    elapsed: Duration,
}

impl Throughput {
    /// Waits for `tasks` (each returning how many it did) and adds them up.
    async fn collect(mut tasks: JoinSet<anyhow::Result<u64>>, start: Instant, what: &str) -> anyhow::Result<Self> {
        let mut done = 0;
        while let Some(joined) = tasks.join_next().await {
            done += joined.with_context(|| format!("{what} panicked"))??;
        }
        Ok(Self {
            done,
            elapsed: start.elapsed(),
        })
    }

    fn per_second(self) -> f64 {
        rate(self.done, self.elapsed)
    }
}

/// Which accounts a consume measurement uses.
#[derive(Debug, Clone, Copy)]
enum Spread {
    /// `c-{k % accounts}`.
    Accounts(u64),
    /// `hot-0` only.
    Hot,
}

impl Spread {
    fn account(self, k: u64) -> String {
        match self {
            Self::Accounts(n) => format!("c-{}", k % n),
            Self::Hot => "hot-0".to_owned(),
        }
    }

    fn name(self) -> String {
        match self {
            Self::Accounts(n) => format!("spread over {n} accounts"),
            Self::Hot => "one hot account".to_owned(),
        }
    }
}

/// Puts `c-0` … `c-{accounts-1}` and `hot-0` on plan `scale` (SQL, one statement).
async fn assign_scale(url: &str, accounts: u64) -> anyhow::Result<()> {
    if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await?;
        sqlx::raw_sql(&format!(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i + 1 < {accounts}) \
             INSERT INTO account_plans (account, plan, effective_at, created_at) \
             SELECT 'c-' || i, 'scale', 0, 0 FROM n UNION ALL SELECT 'hot-0', 'scale', 0, 0"
        ))
        .execute(&mut conn)
        .await?;
        conn.close().await.ok();
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        sqlx::raw_sql(&format!(
            "INSERT INTO account_plans (account, plan, effective_at, created_at) \
             SELECT 'c-' || i, 'scale', 'epoch'::timestamptz, 'epoch'::timestamptz FROM generate_series(0, {accounts} - 1) AS g(i) \
             UNION ALL SELECT 'hot-0', 'scale', 'epoch'::timestamptz, 'epoch'::timestamptz; ANALYZE account_plans"
        ))
        .execute(&mut conn)
        .await?;
        conn.close().await.ok();
    }
    Ok(())
}

/// `clients` concurrent tasks calling `Quotas::consume` (what the HTTP
/// handler calls) on `store` for `--consume-seconds`.
async fn consume_in_process(
    args: &QuotaArgs,
    clients: u64,
    store: &Arc<dyn Store>,
    catalog: &Arc<crate::domain::Catalog>,
    spread: Spread,
    tag: &str,
) -> anyhow::Result<Throughput> {
    let (resource, spec) = catalog.resource(CONSUME_RESOURCE)?;
    let (resource, one) = (resource.clone(), Amount::from_minor(1, spec.decimals));
    let rates = Arc::new(crate::usage::rate_limit::RateLimits::default());
    let counter = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.consume_seconds);
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..clients {
        let (store, catalog, rates, counter) = (store.clone(), catalog.clone(), rates.clone(), counter.clone());
        let (resource, tag, dated) = (resource.clone(), tag.to_owned(), args.dated);
        tasks.spawn(async move {
            let quotas = Quotas {
                store: store.as_ref(),
                catalog: &catalog,
            };
            let mut done = 0_u64;
            while Instant::now() < deadline {
                let k = counter.fetch_add(1, Ordering::Relaxed);
                let entry = NewEntry {
                    account: AccountId::parse(&spread.account(k)).map_err(anyhow::Error::msg)?,
                    resource: resource.clone(),
                    amount: one,
                    idempotency_key: IdempotencyKey::parse(&format!("{tag}-{k}")).map_err(anyhow::Error::msg)?,
                    occurred_at: chrono::Utc::now().trunc_subsecs(6),
                    occurred_at_given: dated,
                    source: None,
                    metadata: None,
                    reverses: None,
                };
                match quotas.consume(&entry, &rates, chrono::Utc::now()).await? {
                    ConsumeOutcome::Recorded { replayed: false, .. } => done += 1,
                    other => bail!("consume {k} was not recorded: {other:?}"),
                }
            }
            anyhow::Ok(done)
        });
    }
    Throughput::collect(tasks, start, "a consume task").await
}

/// `clients` concurrent HTTP clients posting consumes for `--consume-seconds`.
async fn consume_tally(
    args: &QuotaArgs,
    clients: u64,
    tally: &RunningTally,
    spread: Spread,
    tag: &str,
) -> anyhow::Result<Throughput> {
    let url: Arc<str> = tally.url("/v1/quota/consume").into();
    let auth: Arc<str> = format!("Bearer {}", tally.admin_key()).into();
    let counter = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.consume_seconds);
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..clients {
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(1)
            .timeout(Duration::from_secs(60))
            .build()?;
        let (url, auth, counter, tag, dated) = (url.clone(), auth.clone(), counter.clone(), tag.to_owned(), args.dated);
        tasks.spawn(async move {
            let mut done = 0_u64;
            while Instant::now() < deadline {
                let k = counter.fetch_add(1, Ordering::Relaxed);
                let mut body = serde_json::json!({
                    "account": spread.account(k),
                    "resource": CONSUME_RESOURCE,
                    "amount": "1",
                    "idempotency_key": format!("{tag}-{k}"),
                });
                if dated {
                    body["occurred_at"] = chrono::Utc::now()
                        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
                        .into();
                }
                let body = serde_json::to_vec(&body)?;
                let response = client
                    .post(&*url)
                    .header(AUTHORIZATION, &*auth)
                    .header(CONTENT_TYPE, "application/json")
                    .body(body)
                    .send()
                    .await?;
                let status = response.status();
                if !status.is_success() {
                    let text = response.text().await.unwrap_or_default();
                    bail!("POST /v1/quota/consume: {status}: {text}");
                }
                response.bytes().await?;
                done += 1;
            }
            anyhow::Ok(done)
        });
    }
    Throughput::collect(tasks, start, "a consume client").await
}

/// The counter-upsert baseline from `clients` concurrent connections.
async fn consume_baseline(args: &QuotaArgs, clients: u64, url: &str, spread: Spread) -> anyhow::Result<Throughput> {
    let counter = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    // Each branch opens its connections first and only then starts the
    // clock, as Tally's phases run on a pool that is open already.
    let start;
    if url.starts_with("sqlite:") {
        // One writer connection, as Tally's SQLite store has.
        let options = std::str::FromStr::from_str(url).map(|o: sqlx::sqlite::SqliteConnectOptions| {
            o.journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                .synchronous(sqlx::sqlite::SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(10))
        })?;
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await?;
        let deadline = Instant::now() + Duration::from_secs(args.consume_seconds);
        start = Instant::now();
        for _ in 0..clients {
            let (pool, counter) = (pool.clone(), counter.clone());
            tasks.spawn(async move {
                let mut done = 0_u64;
                while Instant::now() < deadline {
                    let k = counter.fetch_add(1, Ordering::Relaxed);
                    sqlx::query(
                        "INSERT INTO counters (account, resource, count) VALUES (?1, ?2, 1) \
                         ON CONFLICT (account, resource) DO UPDATE SET count = count + 1",
                    )
                    .bind(spread.account(k))
                    .bind(CONSUME_RESOURCE)
                    .execute(&pool)
                    .await?;
                    done += 1;
                }
                anyhow::Ok(done)
            });
        }
    } else {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(u32::try_from(clients)?)
            .min_connections(u32::try_from(clients)?)
            .connect(url)
            .await?;
        let deadline = Instant::now() + Duration::from_secs(args.consume_seconds);
        start = Instant::now();
        for _ in 0..clients {
            let (pool, counter) = (pool.clone(), counter.clone());
            tasks.spawn(async move {
                let mut conn = pool.acquire().await?;
                let mut done = 0_u64;
                while Instant::now() < deadline {
                    let k = counter.fetch_add(1, Ordering::Relaxed);
                    sqlx::query("SELECT bump($1, $2)")
                        .bind(spread.account(k))
                        .bind(CONSUME_RESOURCE)
                        .execute(&mut *conn)
                        .await?;
                    done += 1;
                }
                anyhow::Ok(done)
            });
        }
    }
    Throughput::collect(tasks, start, "a baseline client").await
}

/// Before a measured phase: folds what the previous phase left unfolded
/// (so the scheduled rollup's catch-up does not land in the next phase's
/// window) and, on PostgreSQL, writes out its dirty pages (`CHECKPOINT`).
async fn settle(store: &dyn Store, url: &str) -> anyhow::Result<()> {
    let mut caught_up = false;
    for _ in 0..100 {
        crate::jobs::rollup::run(store, &RollupOptions::default(), &Metrics::default()).await?;
        if store.oldest_unfolded().await?.is_none() {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !caught_up {
        // Measured anyway, but said: the next phase may pay for a fold.
        eprintln!("warning: the rollup did not catch up within 10 s before this phase");
    }
    if !url.starts_with("sqlite:") {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        sqlx::raw_sql("CHECKPOINT").execute(&mut conn).await?;
        conn.close().await.ok();
    }
    Ok(())
}

/// One integer from `sql` on the database at `url`.
async fn scalar_i64(url: &str, sql: &str) -> anyhow::Result<i64> {
    Ok(if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await?;
        let value = sqlx::query_scalar(sql).fetch_one(&mut conn).await?;
        conn.close().await.ok();
        value
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await?;
        let value = sqlx::query_scalar(sql).fetch_one(&mut conn).await?;
        conn.close().await.ok();
        value
    })
}

/// Everything the counter baseline has counted so far.
async fn counters_sum(url: &str) -> anyhow::Result<i64> {
    scalar_i64(url, "SELECT CAST(COALESCE(SUM(count), 0) AS BIGINT) FROM counters").await
}

/// One consume measurement: Tally in-process, over HTTP, and the baseline,
/// at one count of concurrent callers.
struct Measured {
    clients: u64,
    spread: Spread,
    in_process: Throughput,
    http: Throughput,
    baseline: Throughput,
}

/// The consume part on one engine (PostgreSQL: on a cluster of the given
/// durability); returns (targets met, summary lines).
async fn consume_on(args: &QuotaArgs, engine: Engine, durability: Durability) -> anyhow::Result<(bool, Vec<String>)> {
    let sqlite;
    let pg;
    let (url, baseline_url) = match engine {
        Engine::Sqlite => {
            sqlite = SqliteScratch::new()?;
            (sqlite.url("consume.db"), sqlite.url("counters.db"))
        }
        Engine::Postgres => {
            eprintln!("[postgres] starting a throwaway cluster ({})…", durability.settings());
            pg = PgScratch::start_with(durability).await?;
            (pg.create_database().await?, pg.create_database().await?)
        }
    };
    let tally = RunningTally::start_with_jobs(&url).await?;
    let (store, catalog) = open(&url).await?;
    assign_scale(&url, args.accounts).await?;
    match engine {
        Engine::Sqlite => {
            let mut conn = sqlx::SqliteConnection::connect_with(&std::str::FromStr::from_str(&baseline_url).map(
                |o: sqlx::sqlite::SqliteConnectOptions| {
                    o.create_if_missing(true)
                        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
                },
            )?)
            .await?;
            sqlx::raw_sql(
                "CREATE TABLE counters (account TEXT NOT NULL, resource TEXT NOT NULL, count INTEGER NOT NULL, \
                 PRIMARY KEY (account, resource)) STRICT, WITHOUT ROWID",
            )
            .execute(&mut conn)
            .await?;
            conn.close().await.ok();
        }
        Engine::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&baseline_url).await?;
            sqlx::raw_sql(
                "CREATE TABLE counters (account TEXT NOT NULL, resource TEXT NOT NULL, count BIGINT NOT NULL, \
                 PRIMARY KEY (account, resource)); \
                 CREATE FUNCTION bump(a text, r text) RETURNS void LANGUAGE sql AS $$ \
                 INSERT INTO counters (account, resource, count) VALUES (a, r, 1) \
                 ON CONFLICT (account, resource) DO UPDATE SET count = counters.count + 1 $$",
            )
            .execute(&mut conn)
            .await?;
            conn.close().await.ok();
        }
    }

    let mut results = Vec::new();
    for &clients in &args.clients {
        for (spread, tag) in [(Spread::Accounts(args.accounts), "s"), (Spread::Hot, "h")] {
            // Keys stay unique across client counts: each count is a new run.
            let tag = format!("{tag}{clients}");
            eprintln!(
                "[{engine}] Tally in-process: Quotas::consume, {clients} tasks, {}, {} s…",
                spread.name(),
                args.consume_seconds
            );
            settle(store.as_ref(), &url).await?;
            let in_process = consume_in_process(args, clients, &store, &catalog, spread, &format!("{tag}p")).await?;
            eprintln!(
                "[{engine}] Tally over HTTP: POST /v1/quota/consume, {clients} clients, {}, {} s…",
                spread.name(),
                args.consume_seconds
            );
            settle(store.as_ref(), &url).await?;
            let http = consume_tally(args, clients, &tally, spread, &tag).await?;
            eprintln!(
                "[{engine}] baseline: counter upsert, {clients} connections, {}…",
                spread.name()
            );
            settle(store.as_ref(), &url).await?;
            let counted_before = counters_sum(&baseline_url).await?;
            let baseline = consume_baseline(args, clients, &baseline_url, spread).await?;
            let counted = counters_sum(&baseline_url).await? - counted_before;
            ensure!(
                counted == i64::try_from(baseline.done)?,
                "the counters grew by {counted} for {} baseline calls",
                baseline.done
            );
            results.push(Measured {
                clients,
                spread,
                in_process,
                http,
                baseline,
            });
        }
    }
    // The ledger must hold exactly what was consumed: on the hot account
    // and over the spread accounts (a plain SUM, whatever day it is now).
    tally.stop().await?;
    for (spread_is_hot, accounts) in [(true, "account = 'hot-0'"), (false, "account LIKE 'c-%'")] {
        let done: u64 = results
            .iter()
            .filter(|m| matches!(m.spread, Spread::Hot) == spread_is_hot)
            .map(|m| m.in_process.done + m.http.done)
            .sum();
        let sql = format!(
            "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM entries WHERE resource = '{CONSUME_RESOURCE}' AND {accounts}"
        );
        let recorded = scalar_i64(&url, &sql).await?;
        ensure!(
            recorded == i64::try_from(done)?,
            "the ledger holds {recorded} for {done} consumes ({accounts})"
        );
    }

    let settings = settings_of(engine, durability);
    let durability_tag = match engine {
        Engine::Sqlite => String::new(),
        Engine::Postgres => format!(" durability={durability:?}").to_lowercase(),
    };
    println!();
    println!(
        "quota consume  engine={engine}{durability_tag}  seconds={} resource={CONSUME_RESOURCE} plan=scale (unlimited) jobs=built-in{}",
        args.consume_seconds,
        if args.dated {
            " consumes=dated (occurred_at given)"
        } else {
            ""
        }
    );
    println!("  settings    {settings}");
    let dated_tag = if args.dated { " dated" } else { "" };
    let mut met = true;
    let mut lines = Vec::new();
    for Measured {
        clients,
        spread,
        in_process,
        http,
        baseline,
    } in results
    {
        let ratio = in_process.per_second() / baseline.per_second().max(1e-9);
        let http_ratio = http.per_second() / baseline.per_second().max(1e-9);
        met &= ratio >= TARGET_CONSUME_RATIO;
        println!(
            "  clients={clients:<4} {:<26} in-process {:>8.0}/s ({} in {:.1} s)  http {:>8.0}/s ({} in {:.1} s)  \
             baseline {:>8.0}/s ({} in {:.1} s)  ratio {ratio:.2} (http {http_ratio:.2})",
            spread.name(),
            in_process.per_second(),
            in_process.done,
            in_process.elapsed.as_secs_f64(),
            http.per_second(),
            http.done,
            http.elapsed.as_secs_f64(),
            baseline.per_second(),
            baseline.done,
            baseline.elapsed.as_secs_f64()
        );
        lines.push(format!(
            "summary engine={:<8}{durability_tag}{dated_tag} consume clients={clients:<4} {:<26} tally={:.0}/s baseline={:.0}/s \
             ratio={ratio:.2} (target ≥ {TARGET_CONSUME_RATIO:.1}: {}); over HTTP {:.0}/s ({http_ratio:.2})",
            engine.name(),
            spread.name(),
            in_process.per_second(),
            baseline.per_second(),
            if ratio >= TARGET_CONSUME_RATIO {
                "met"
            } else {
                "NOT met"
            },
            http.per_second(),
        ));
    }
    println!(
        "  checked     the ledger's sums for hot-0 and for the spread accounts = consumes recorded (in-process and HTTP); \
         the counters' growth = baseline calls, per phase"
    );
    std::io::stdout().flush().ok();
    Ok((met, lines))
}
