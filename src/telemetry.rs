//! Logs and metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// An error and its causes, `outer: inner: …`, for the log (5xx details
/// never go to the client, so the log must carry the whole chain) and the
/// command line. A cause whose words its parent already quotes (sqlx's I/O
/// and SQLite errors repeat their source) is not said twice.
pub fn cause_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut parent = text.clone();
    let mut source = e.source();
    while let Some(cause) = source {
        let words = cause.to_string();
        if !parent.contains(&words) {
            text.push_str(": ");
            text.push_str(&words);
        }
        parent = words;
        source = cause.source();
    }
    text
}

/// The log filter when `RUST_LOG` is unset (or does not parse).
const DEFAULT_LOG_FILTER: &str = "info,sqlx=warn,tower_http=warn,tokio_cron_scheduler=warn";

/// Sets up `tracing` to stderr, filtered by `RUST_LOG` (default
/// `DEFAULT_LOG_FILTER`). A `RUST_LOG` that does not parse is said, not
/// silently replaced: an operator who asked for debug logs would wait for
/// them in vain.
pub fn init_tracing() {
    let (filter, refused) = match std::env::var(tracing_subscriber::EnvFilter::DEFAULT_ENV) {
        Ok(raw) if !raw.trim().is_empty() => match tracing_subscriber::EnvFilter::try_new(&raw) {
            Ok(filter) => (filter, None),
            Err(e) => (tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER), Some((raw, e))),
        },
        _ => (tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER), None),
    };
    // A second init (tests) is harmless; ignore it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A line stderr cannot take (a full disk under the log file) is
        // dropped. The default reports the failed write with `eprintln!`,
        // which panics when stderr fails: `serve` died at its first log line,
        // and a request that logged answered 500 (review BQ).
        .log_internal_errors(false)
        .try_init();
    if let Some((raw, e)) = refused {
        tracing::warn!(
            rust_log = %raw,
            "RUST_LOG {raw:?} is not a log filter ({e}); using {DEFAULT_LOG_FILTER:?}. \
             Write it like info,tally=debug"
        );
    }
}

/// Labels of an HTTP request counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The matched route pattern (`/v1/accounts/{account}/entries`), not the raw path.
    pub route: String,
    /// GET, POST, …
    pub method: String,
    /// The response status code.
    pub status: u16,
}

/// Labels of a job failure counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    /// The job's name (`rollup`, `monthly-reports`, …).
    pub job: String,
}

/// Process-wide metrics, exposed at `GET /metrics` in Prometheus text format.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Ledger rows created by this process.
    pub entries_ingested: Counter,
    /// Ledger rows folded into totals by this process.
    pub entries_folded: Counter,
    /// Rollup runs finished by this process.
    pub rollup_runs: Counter,
    /// Rollup runs that failed.
    pub rollup_failures: Counter,
    /// Rollup runs of this process that failed since its last good one.
    pub rollup_failures_in_a_row: Gauge,
    /// Seconds since the oldest unfolded entry was recorded (set at scrape time).
    pub rollup_lag_seconds: Gauge,
    /// 1 when the database answered the scrape's lag query, else 0 (the lag
    /// then keeps its last value).
    pub database_up: Gauge,
    /// HTTP requests by route, method and status.
    pub http_requests: Family<HttpLabels, Counter>,
    /// HTTP connections open now (at most `serve --max-connections`).
    pub http_connections_open: Gauge,
    /// Job runs of this process that failed, by job (any job; the rollup's
    /// are also in `rollup_failures`).
    pub job_failures: Family<JobLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tally");
        let entries_ingested = Counter::default();
        let entries_folded = Counter::default();
        let rollup_runs = Counter::default();
        let rollup_failures = Counter::default();
        let rollup_failures_in_a_row = Gauge::default();
        let rollup_lag_seconds = Gauge::default();
        let database_up = Gauge::default();
        let http_requests = Family::<HttpLabels, Counter>::default();
        let http_connections_open = Gauge::default();
        let job_failures = Family::<JobLabels, Counter>::default();
        registry.register("entries_ingested", "Ledger entries created", entries_ingested.clone());
        registry.register(
            "entries_folded",
            "Ledger entries folded into totals",
            entries_folded.clone(),
        );
        registry.register("rollup_runs", "Rollup runs finished", rollup_runs.clone());
        registry.register("rollup_failures", "Rollup runs that failed", rollup_failures.clone());
        registry.register(
            "rollup_failures_in_a_row",
            "Rollup runs of this process that failed since its last good one",
            rollup_failures_in_a_row.clone(),
        );
        registry.register(
            "rollup_lag_seconds",
            "Seconds since the oldest entry not yet folded was recorded",
            rollup_lag_seconds.clone(),
        );
        registry.register(
            "database_up",
            "1 when the database answered at the last scrape, else 0 (rollup_lag_seconds is then stale)",
            database_up.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests by route, method and status",
            http_requests.clone(),
        );
        registry.register(
            "http_connections_open",
            "HTTP connections open now (at most serve --max-connections)",
            http_connections_open.clone(),
        );
        registry.register("job_failures", "Job runs that failed, by job", job_failures.clone());
        Self {
            registry,
            entries_ingested,
            entries_folded,
            rollup_runs,
            rollup_failures,
            rollup_failures_in_a_row,
            rollup_lag_seconds,
            database_up,
            http_requests,
            http_connections_open,
            job_failures,
        }
    }
}

impl Metrics {
    /// Counts a failed rollup run (what `/healthz` calls degraded).
    pub fn rollup_failed(&self) {
        self.rollup_failures.inc();
        self.rollup_failures_in_a_row.inc();
    }

    /// Shows job `name`'s failure counter at 0 before any failure: a series
    /// that first appears above 0 hides its first failures from `increase()`
    /// and `rate()`, the alert docs/operations.md suggests.
    pub fn job_known(&self, name: &str) {
        drop(self.job_failures.get_or_create(&JobLabels { job: name.to_owned() }));
    }

    /// Counts a failed run of job `name`.
    pub fn job_failed(&self, name: &str) {
        self.job_failures
            .get_or_create(&JobLabels { job: name.to_owned() })
            .inc();
    }

    /// Counts newly created ledger rows.
    pub fn entries_ingested(&self, n: u64) {
        self.entries_ingested.inc_by(n);
    }

    /// Every metric in the OpenMetrics text format (what Prometheus asks for).
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }

    /// Every metric in Prometheus' classic text format (0.0.4), for scrapers
    /// that do not ask for OpenMetrics: a counter's `# HELP`/`# TYPE` lines
    /// name its samples (`…_total`), and there is no `# EOF`. The two formats
    /// differ in nothing else for counters and gauges, all Tally has.
    pub fn render_classic(&self) -> String {
        let open = self.render();
        let counters: std::collections::HashSet<&str> = open
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
            .collect();
        let mut text = String::with_capacity(open.len() + 16 * counters.len());
        for line in open.lines() {
            if line == "# EOF" || line.starts_with("# UNIT ") {
                continue;
            }
            let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
                let rest = line.strip_prefix(prefix)?;
                let (name, tail) = rest.split_once(' ')?;
                counters.contains(name).then(|| format!("{prefix}{name}_total {tail}"))
            });
            text.push_str(renamed.as_deref().unwrap_or(line));
            text.push('\n');
        }
        text
    }
}
