//! Spawning the app on a fresh database, and a client that speaks its API.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;
use tally::app::{Application, Settings};
use tally::domain::{Catalog, Role};
use tally::store::Store;
use tally::testing::pg_cluster::{Durability, PgCluster};
use tempfile::TempDir;

/// The engines every test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generates `on_sqlite` and `on_postgres` tests for each listed
/// `async fn name(app: TestApp)`; after `plans = CONST;` the app runs with
/// the plan catalog in `CONST` (TOML).
#[macro_export]
macro_rules! both {
    (plans = $plans:ident; $($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_sqlite() {
                if let Some(app) =
                    $crate::helpers::TestApp::spawn_with_plans($crate::helpers::Backend::Sqlite, Some(super::$plans)).await
                {
                    super::$name(app).await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_postgres() {
                if let Some(app) =
                    $crate::helpers::TestApp::spawn_with_plans($crate::helpers::Backend::Postgres, Some(super::$plans)).await
                {
                    super::$name(app).await;
                }
            }
        }
    )+};
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_sqlite() {
                if let Some(app) = $crate::helpers::TestApp::spawn($crate::helpers::Backend::Sqlite).await {
                    super::$name(app).await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn on_postgres() {
                if let Some(app) = $crate::helpers::TestApp::spawn($crate::helpers::Backend::Postgres).await {
                    super::$name(app).await;
                }
            }
        }
    )+};
}

/// A fresh database URL for `backend`, or `None` when PostgreSQL is not
/// installed and not required (`TALLY_TEST_REQUIRE_POSTGRES=1` makes that a failure).
pub async fn fresh_database(backend: Backend) -> Option<(String, Option<TempDir>)> {
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().expect("temp dir");
            let url = format!("sqlite://{}", dir.path().join("tally.db").display());
            Some((url, Some(dir)))
        }
        Backend::Postgres => match PgCluster::shared() {
            Ok(cluster) => Some((cluster.create_database().await.expect("create database"), None)),
            Err(e) if std::env::var("TALLY_TEST_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") => {
                panic!("PostgreSQL is required (TALLY_TEST_REQUIRE_POSTGRES=1) but unavailable: {e}")
            }
            Err(e) => {
                eprintln!("skipping a PostgreSQL test: {e}");
                None
            }
        },
    }
}

/// libfaketime's preload library (Debian's `faketime`), for a test that runs
/// `tally serve` on a clock of its own; `None` (skip) when it is not
/// installed and PostgreSQL is not required: `.ci/run` installs both, and
/// `TALLY_TEST_REQUIRE_POSTGRES=1` makes its absence a failure too.
pub fn faketime_library() -> Option<String> {
    let found = std::fs::read_dir("/usr/lib").ok().and_then(|dirs| {
        dirs.flatten()
            .map(|dir| dir.path().join("faketime/libfaketime.so.1"))
            .find(|library| library.is_file())
    });
    match found {
        Some(library) => Some(library.display().to_string()),
        None if std::env::var("TALLY_TEST_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") => {
            panic!(
                "faketime is required (TALLY_TEST_REQUIRE_POSTGRES=1) but /usr/lib/*/faketime/libfaketime.so.1 is missing: apt-get install faketime"
            )
        }
        None => {
            eprintln!("skipping a test on a clock of its own: libfaketime is not installed (apt-get install faketime)");
            None
        }
    }
}

/// A PostgreSQL cluster of the caller's own, for a test that stops or
/// breaks its server; `None` (skip) when PostgreSQL is not installed and not
/// required, as in [`fresh_database`]. Durable (PostgreSQL's defaults): the
/// shared cluster's `synchronous_commit = off` would lose the last commits
/// to an immediate stop, as a crash does.
pub fn own_pg_cluster() -> Option<PgCluster> {
    own_pg_cluster_from(|| PgCluster::start_with(Durability::Durable))
}

/// [`own_pg_cluster`], started by `start` (a cluster that listens on TCP,
/// say).
pub fn own_pg_cluster_from(start: impl FnOnce() -> anyhow::Result<PgCluster>) -> Option<PgCluster> {
    match start() {
        Ok(cluster) => Some(cluster),
        Err(e) if std::env::var("TALLY_TEST_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") => {
            panic!("PostgreSQL is required (TALLY_TEST_REQUIRE_POSTGRES=1) but unavailable: {e:#}")
        }
        Err(e) => {
            eprintln!("skipping a PostgreSQL test: {e:#}");
            None
        }
    }
}

/// The running app and what a test needs to talk to it.
pub struct TestApp {
    pub backend: Backend,
    pub address: String,
    pub database_url: String,
    pub admin_key: String,
    pub client: reqwest::Client,
    pub store: Arc<dyn Store>,
    pub catalog: Arc<Catalog>,
    /// The served app's own job runner (the built-in jobs over its store and
    /// its metrics), so that what a run counts shows in `GET /metrics`.
    pub jobs: Arc<tally::jobs::JobRunner>,
    /// The served app's clock: `clock.freeze_at(t)` makes "now" `t` for
    /// its handlers.
    pub clock: tally::clock::Clock,
    /// The plan catalog file the app runs with (None: the built-in one).
    plans_file: Option<tempfile::NamedTempFile>,
    _dir: Option<TempDir>,
}

/// A response's status and JSON body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    /// The body as sent, for what `body` loses (its fields' order).
    pub text: String,
}

impl Reply {
    /// The error code of a contract error body.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or_default()
    }
}

impl TestApp {
    /// Builds the real application on port 0 over a fresh database.
    pub async fn spawn(backend: Backend) -> Option<Self> {
        Self::spawn_with_plans(backend, None).await
    }

    /// Builds the real application on port 0 over a fresh database, with the
    /// plan catalog `plans` (TOML; None: the built-in one).
    pub async fn spawn_with_plans(backend: Backend, plans: Option<&str>) -> Option<Self> {
        let (database_url, dir) = fresh_database(backend).await?;
        Some(Self::spawn_on(backend, database_url, dir, plans).await)
    }

    /// Builds the real application on port 0 over the database at
    /// `database_url` (kept alive by `dir`, if any), with the plan catalog
    /// `plans` (TOML; None: the built-in one).
    pub async fn spawn_on(backend: Backend, database_url: String, dir: Option<TempDir>, plans: Option<&str>) -> Self {
        tally::telemetry::init_tracing();
        clear_of_midnight().await;
        let admin_key = "test-admin-key".to_owned();
        let plans_file = plans.map(|text| {
            let file = tempfile::NamedTempFile::new().expect("temp file");
            std::fs::write(file.path(), text).expect("the catalog is written");
            file
        });
        let settings = Settings {
            database_url: database_url.clone(),
            listen: "127.0.0.1:0".parse().unwrap(),
            admin_key: Some(admin_key.clone()),
            plans: plans_file.as_ref().map(|f| f.path().to_owned()),
            ..Settings::default()
        };
        let app = Application::build(&settings).await.expect("the app builds");
        let address = format!("http://127.0.0.1:{}", app.port());
        let store = app.state().store.clone();
        let catalog = app.state().catalog.clone();
        let jobs = app.job_runner(tally::jobs::builtin());
        let clock = app.state().clock.clone();
        tokio::spawn(app.run_until(std::future::pending()));
        Self {
            backend,
            address,
            database_url,
            admin_key,
            client: reqwest::Client::new(),
            store,
            catalog,
            jobs,
            clock,
            plans_file,
            _dir: dir,
        }
    }

    /// Sets an override as if at `since` (the app's clock frozen there for
    /// the PUT): an override is in force only from when it is set, so one
    /// meant for backdated instants is set before them.
    pub async fn put_override_since(
        &self,
        account: &str,
        resource: &str,
        body: Value,
        since: chrono::DateTime<chrono::Utc>,
    ) -> Reply {
        self.clock.freeze_at(since);
        let reply = self
            .put_admin(&format!("/v1/accounts/{account}/overrides/{resource}"), body)
            .await;
        self.clock.thaw();
        reply
    }

    /// Sends the head of `method path` with `key` and `headers` (lines ending
    /// in CRLF, e.g. a `Content-Length`) but no body bytes, and returns what
    /// the app answers within 5 s (panics on silence): for requests that must
    /// be refused from their head alone.
    pub async fn answer_to_head(&self, method: &str, path: &str, key: &str, headers: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let address = self.address.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(address).await.expect("connects");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\n{headers}\r\n"
        );
        stream.write_all(request.as_bytes()).await.expect("the head is sent");
        let mut answer = Vec::new();
        let mut buffer = [0_u8; 4096];
        let read = async {
            // Until the JSON error body has arrived.
            while !answer.ends_with(b"}") {
                let n = stream.read(&mut buffer).await.expect("reads");
                if n == 0 {
                    break;
                }
                answer.extend_from_slice(&buffer[..n]);
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), read)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{method} {path}: no answer before the body was sent; got {:?}",
                    String::from_utf8_lossy(&answer)
                )
            });
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// Sends a request with `key` (None: no Authorization header).
    pub async fn request(&self, method: &str, path: &str, key: Option<&str>, body: Option<String>) -> Reply {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = self.client.request(method, format!("{}{path}", self.address));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body);
        }
        let response = request.send().await.expect("the request reaches the app");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or_else(|_| Value::String(text.clone()));
        Reply {
            status,
            headers,
            body,
            text,
        }
    }

    /// PUT with the admin key (plans and overrides).
    pub async fn put_admin(&self, path: &str, body: Value) -> Reply {
        self.request("PUT", path, Some(&self.admin_key), Some(body.to_string()))
            .await
    }

    /// DELETE with the admin key (overrides).
    pub async fn delete_admin(&self, path: &str) -> Reply {
        self.request("DELETE", path, Some(&self.admin_key), None).await
    }

    /// POST as admin.
    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.request("POST", path, Some(&self.admin_key), Some(body.to_string()))
            .await
    }

    /// GET as admin.
    pub async fn get(&self, path: &str) -> Reply {
        self.request("GET", path, Some(&self.admin_key), None).await
    }

    /// POST /v1/entries as admin.
    pub async fn post_entries(&self, body: Value) -> Reply {
        self.post("/v1/entries", body).await
    }

    /// A new key with `role`, bound to `account` if given.
    pub async fn key(&self, role: Role, account: Option<&str>) -> String {
        let account = account.map(|a| tally::domain::AccountId::parse(a).unwrap());
        let (secret, new) = tally::app::new_key(role, account, None).unwrap();
        self.store.create_api_key(&new).await.unwrap();
        secret.expose().to_owned()
    }

    /// Every ledger row, read straight from the database.
    pub async fn count_entries(&self) -> i64 {
        self.scalar_i64("SELECT COUNT(*) FROM entries").await
    }

    /// Runs a statement on the database directly, outside the app.
    pub async fn execute_raw(&self, sql: &str) -> Result<u64, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => {
                let pool = sqlx::SqlitePool::connect(&self.database_url).await?;
                Ok(sqlx::query(sql).execute(&pool).await?.rows_affected())
            }
            Backend::Postgres => {
                let pool = sqlx::PgPool::connect(&self.database_url).await?;
                Ok(sqlx::query(sql).execute(&pool).await?.rows_affected())
            }
        }
    }

    /// One integer from a query run directly on the database.
    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        scalar_i64_at(self.backend, &self.database_url, sql).await
    }
}

/// Waits, when 00:00 UTC is less than a minute away, until it has passed.
/// Tests read "now" at several moments (the app's clock, the CLI's, the
/// Retry-After count-down), and a test that straddled midnight would see two
/// days, or two months, in what it means as one window; none lasts a minute.
async fn clear_of_midnight() {
    let now = chrono::Utc::now();
    let midnight = (now.date_naive() + chrono::Days::new(1))
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc();
    let left = midnight - now;
    if left < chrono::Duration::minutes(1) {
        let wait = left.to_std().unwrap_or_default() + std::time::Duration::from_secs(1);
        tokio::time::sleep(wait).await;
    }
}

/// The UTC day `days` before today, as `YYYY-MM-DD`: entries posted over
/// HTTP must fall inside the late-arrival horizon (35 days), so tests that
/// post a given instant take it relative to today, not as a fixed date.
pub fn days_ago(days: i64) -> String {
    (chrono::Utc::now() - chrono::Duration::days(days))
        .format("%Y-%m-%d")
        .to_string()
}

/// `time` (`HH:MM:SS`) on the UTC day `days` before today, as RFC 3339.
pub fn days_ago_at(days: i64, time: &str) -> String {
    format!("{}T{time}Z", days_ago(days))
}

/// The row of `resource` in a usage report (`GET …/usage` or `tally usage`);
/// panics, showing the report, when it has none.
pub fn usage_row<'a>(report: &'a Value, resource: &str) -> &'a Value {
    report["resources"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["resource"] == resource))
        .unwrap_or_else(|| panic!("no {resource} row in {report}"))
}

/// A valid entry for `account` with `key`.
pub fn entry(account: &str, resource: &str, amount: &str, key: &str) -> Value {
    serde_json::json!({ "account": account, "resource": resource, "amount": amount, "idempotency_key": key })
}

/// A valid entry (see [`entry`]) that occurred at `at`.
pub fn entry_at(account: &str, resource: &str, amount: &str, key: &str, at: &str) -> Value {
    let mut body = entry(account, resource, amount, key);
    body["occurred_at"] = serde_json::json!(at);
    body
}

/// The plain SUM over the ledger for one account and resource, in minor
/// units: what every exactness test compares the API's answers with.
fn ledger_sum_sql(account: &str, resource: &str) -> String {
    format!(
        "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM entries WHERE account = '{account}' AND resource = '{resource}'"
    )
}

impl TestApp {
    /// Appends entries straight through the store, skipping the late-arrival
    /// horizon so tests can use fixed dates. Each tuple: (account, resource,
    /// amount, idempotency key, occurred_at).
    pub async fn insert(&self, rows: &[(&str, &str, &str, &str, &str)]) -> Vec<i64> {
        let inputs = rows
            .iter()
            .map(|(account, resource, amount, key, at)| {
                serde_json::from_value(serde_json::json!({
                    "account": account, "resource": resource, "amount": amount,
                    "idempotency_key": key, "occurred_at": at,
                }))
                .unwrap()
            })
            .collect();
        let rules = tally::domain::entry::EntryRules {
            catalog: &self.catalog,
            now: chrono::Utc::now(),
            late_horizon: chrono::Duration::days(35),
            allow_late: true,
            too_late: tally::domain::entry::BACKFILL,
        };
        let entries = tally::domain::entry::validate_batch(inputs, rules)
            .expect("valid test entries")
            .entries;
        self.store
            .insert_entries(&entries)
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.id)
            .collect()
    }

    /// Runs the `tally` binary against this app's database.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_in(Path::new("."), args)
    }

    /// [`TestApp::cli`] run in the folder `dir`, for what it writes beside itself.
    pub fn cli_in(&self, dir: &Path, args: &[&str]) -> std::process::Output {
        // The app's own catalog, as an operator runs the CLI beside a server.
        self.cli_command(dir, self.plans_file.as_ref().map(|f| f.path()), args)
    }

    /// [`TestApp::cli`] with the plan catalog `plans` instead of the app's.
    pub fn cli_with_plans(&self, plans: &Path, args: &[&str]) -> std::process::Output {
        self.cli_command(Path::new("."), Some(plans), args)
    }

    /// [`TestApp::cli`] with more environment variables (`TZ`, say).
    pub fn cli_with_env(&self, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
        self.cli_command_with_env(Path::new("."), self.plans_file.as_ref().map(|f| f.path()), env, args)
    }

    /// Runs `tally ARGS` in `dir` on this app's database with the catalog
    /// `plans` (None: the built-in one).
    fn cli_command(&self, dir: &Path, plans: Option<&Path>, args: &[&str]) -> std::process::Output {
        self.cli_command_with_env(dir, plans, &[], args)
    }

    /// [`TestApp::cli_command`] with `env` added to the environment.
    fn cli_command_with_env(
        &self,
        dir: &Path,
        plans: Option<&Path>,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> std::process::Output {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tally"));
        command.envs(env.iter().copied());
        command.current_dir(dir);
        command
            .args(args)
            .env("TALLY_DATABASE_URL", &self.database_url)
            .env_remove("TALLY_PLANS")
            .env("RUST_LOG", "warn");
        if let Some(plans) = plans {
            command.env("TALLY_PLANS", plans);
        }
        command.output().expect("tally runs")
    }

    /// On PostgreSQL, waits until every committed ledger row is below the
    /// cluster's xmin, so that one rollup run folds them all (other tests'
    /// transactions in the same cluster hold it back for a moment); for a
    /// test that counts what one run does. Panics after 5 s.
    pub async fn until_every_row_is_foldable(&self) {
        if self.backend != Backend::Postgres {
            return;
        }
        for _ in 0..500 {
            let foldable = self
                .scalar_i64(
                    "SELECT CAST(CASE WHEN pg_snapshot_xmin(pg_current_snapshot()) > \
                     (SELECT MAX(tx_id) FROM entries) THEN 1 ELSE 0 END AS BIGINT)",
                )
                .await;
            if foldable == 1 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the cluster's xmin never passed the ledger's rows");
    }

    /// Runs the rollup until every committed entry is folded; returns the sum
    /// of the runs' reports. On PostgreSQL one run may stop short: it folds only
    /// rows whose transaction is below the cluster-wide xmin, and other tests'
    /// transactions in the same cluster hold that back for a moment.
    pub async fn rollup(&self) -> tally::jobs::rollup::RollupReport {
        self.rollup_until(tally::jobs::rollup::RollupOptions::default(), None)
            .await
    }

    /// [`TestApp::rollup`] with `options`, until `entries` entries are folded
    /// (`None`: until none is left unfolded), for a test that holds some back
    /// on purpose. Panics after 5 s.
    pub async fn rollup_until(
        &self,
        options: tally::jobs::rollup::RollupOptions,
        entries: Option<u64>,
    ) -> tally::jobs::rollup::RollupReport {
        let mut total = tally::jobs::rollup::RollupReport {
            batches: 0,
            entries: 0,
            elapsed: Default::default(),
            stopped: false,
        };
        for _ in 0..500 {
            let report = self.rollup_with(options).await.unwrap();
            total.batches += report.batches;
            total.entries += report.entries;
            let done = match entries {
                Some(expected) => total.entries >= expected,
                None => self.store.oldest_unfolded().await.unwrap().is_none(),
            };
            if done {
                return total;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!(
            "the rollup did not catch up within 5 s: {} entries folded, {entries:?} expected",
            total.entries
        );
    }

    /// Retries a rollup that should fail at a failpoint until it does (on
    /// PostgreSQL a run may stop short before reaching the failpoint's batch).
    pub async fn rollup_until_failpoint(&self, options: tally::jobs::rollup::RollupOptions) {
        for _ in 0..500 {
            if self.rollup_with(options).await.is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the failpoint never fired");
    }

    /// Runs the rollup with options (batch size, failpoint).
    pub async fn rollup_with(
        &self,
        options: tally::jobs::rollup::RollupOptions,
    ) -> Result<tally::jobs::rollup::RollupReport, tally::jobs::rollup::RollupError> {
        tally::jobs::rollup::run(self.store.as_ref(), &options, &tally::telemetry::Metrics::default()).await
    }

    /// The plain SUM over the ledger for one account and resource, in minor units.
    pub async fn ledger_sum(&self, account: &str, resource: &str) -> i64 {
        self.scalar_i64(&ledger_sum_sql(account, resource)).await
    }

    /// The folded daily total of a bucket, in minor units (0 when absent).
    pub async fn daily_total(&self, account: &str, resource: &str, day: &str) -> i64 {
        let day_expr = match self.backend {
            Backend::Sqlite => format!("'{day}'"),
            Backend::Postgres => format!("DATE '{day}'"),
        };
        self.scalar_i64(&format!(
            "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM daily_totals WHERE account = '{account}' AND resource = '{resource}' AND day = {day_expr}"
        ))
        .await
    }

    /// The folded monthly total of a month (given by its first day), in minor units.
    pub async fn monthly_total(&self, account: &str, resource: &str, month: &str) -> i64 {
        let month_expr = match self.backend {
            Backend::Sqlite => format!("'{month}'"),
            Backend::Postgres => format!("DATE '{month}'"),
        };
        self.scalar_i64(&format!(
            "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM monthly_totals WHERE account = '{account}' AND resource = '{resource}' AND month = {month_expr}"
        ))
        .await
    }

    /// The whole series' sum in minor units, read through the API's time series.
    pub async fn series_sum(&self, account: &str, resource: &str, from: &str, to: &str, granularity: &str) -> i64 {
        let reply = self
            .get(&format!(
                "/v1/accounts/{account}/timeseries?resource={resource}&granularity={granularity}&from={from}&to={to}"
            ))
            .await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        let decimals = self.catalog.decimals(resource);
        reply.body["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| tally::domain::Amount::parse(p["amount"].as_str().unwrap(), decimals).map_or(0, |a| a.minor()))
            .sum()
    }

    /// This app's `GET /metrics` text.
    pub async fn metrics_text(&self) -> String {
        scrape_metrics(&self.client, &self.address).await
    }
}

/// `GET /metrics` of the app at `address` (`http://host:port`), as text.
pub async fn scrape_metrics(client: &reqwest::Client, address: &str) -> String {
    let response = client
        .get(format!("{address}/metrics"))
        .send()
        .await
        .expect("the app answers /metrics");
    assert_eq!(response.status(), 200);
    response.text().await.unwrap()
}

/// The value of the unlabelled sample `name` in a Prometheus text exposition
/// (None when absent), so a test can compare a counter with a number rather
/// than only find its name.
pub fn metric(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(' ')?;
        Some(
            value
                .trim()
                .parse()
                .unwrap_or_else(|e| panic!("{name} is not a whole number: {line:?}: {e}")),
        )
    })
}

/// A `tally serve` child process on `127.0.0.1:0`, its stderr collected line
/// by line (the bootstrap key and the log are read from it). Killed on drop,
/// so a failing test leaves no server behind.
pub struct ServeProcess {
    child: std::process::Child,
    stderr: Arc<std::sync::Mutex<Vec<String>>>,
    /// The address it listens on, read from the process's own log.
    socket: std::net::SocketAddr,
}

impl ServeProcess {
    /// Starts `tally serve --listen 127.0.0.1:0 ARGS` on `database_url` with
    /// the extra environment `envs` (no `TALLY_ADMIN_KEY` unless given), and
    /// waits until it logs the address it listens on.
    pub async fn start(database_url: &str, args: &[&str], envs: &[(&str, &str)]) -> Self {
        Self::start_under(&[], database_url, args, envs).await
    }

    /// [`ServeProcess::start`] through the command `wrapper`, which runs
    /// tally in its own place (`prlimit --nofile=300:300`, say).
    pub async fn start_under(wrapper: &[&str], database_url: &str, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut command = match wrapper.split_first() {
            None => std::process::Command::new(env!("CARGO_BIN_EXE_tally")),
            Some((program, wrapper_args)) => {
                let mut command = std::process::Command::new(program);
                command.args(wrapper_args).arg(env!("CARGO_BIN_EXE_tally"));
                command
            }
        };
        command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("TALLY_DATABASE_URL", database_url)
            .env_remove("TALLY_ADMIN_KEY")
            .env_remove("TALLY_JOBS")
            // Info: the address line and the shutdown steps are logged at info.
            .env("RUST_LOG", "info,sqlx=warn,tokio_cron_scheduler=warn")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        for (name, value) in envs {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("tally serve starts");
        let pipe = child.stderr.take().unwrap();
        let stderr = Arc::new(std::sync::Mutex::new(Vec::new()));
        let lines = stderr.clone();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let mut process = Self {
            child,
            stderr,
            socket: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let marker = "tally listening on http://";
        let line = process
            .wait_for_stderr(marker, std::time::Duration::from_secs(30))
            .await
            .unwrap_or_else(|| panic!("tally serve did not start listening:\n{}", process.stderr()));
        let rest = &line[line.find(marker).unwrap() + marker.len()..];
        let host_port: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        process.socket = host_port.parse().expect("a socket address");
        process
    }

    /// `http://127.0.0.1:PORT`, the base of its URLs.
    pub fn address(&self) -> String {
        format!("http://{}", self.socket)
    }

    /// The address it listens on, for raw TCP.
    pub fn socket_addr(&self) -> std::net::SocketAddr {
        self.socket
    }

    /// Everything the process wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// The first stderr line containing `needle`, waiting up to `timeout`.
    pub async fn wait_for_stderr(&mut self, needle: &str, timeout: std::time::Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(line) = self.stderr.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return Some(line.clone());
            }
            if std::time::Instant::now() > deadline || !self.is_running() {
                // One last look: the line may have come with the exit.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                return self.stderr.lock().unwrap().iter().find(|l| l.contains(needle)).cloned();
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("the child's status is readable").is_none()
    }

    /// Asks the process to stop, as a service manager does (SIGTERM).
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends the signal `name` (`TERM`, `HUP`, …) to the process.
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "SIG{name} was delivered");
    }

    /// Waits for the process to exit (up to `timeout`) and returns its status.
    pub async fn wait_for_exit(&mut self, timeout: std::time::Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "tally serve did not exit within {timeout:?}:\n{}",
                self.stderr()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Connections to a test's database kept open across queries, for loops that
/// read often ([`TestApp::scalar_i64`] connects anew on every call, which
/// would space a sampling loop's reads far apart).
pub enum RawPool {
    /// SQLite.
    Sqlite(sqlx::SqlitePool),
    /// PostgreSQL.
    Postgres(sqlx::PgPool),
}

impl RawPool {
    /// Connects to `app`'s database.
    pub async fn connect(app: &TestApp) -> Self {
        match app.backend {
            Backend::Sqlite => Self::Sqlite(sqlx::SqlitePool::connect(&app.database_url).await.unwrap()),
            Backend::Postgres => Self::Postgres(sqlx::PgPool::connect(&app.database_url).await.unwrap()),
        }
    }

    /// One integer from `sql`.
    pub async fn scalar_i64(&self, sql: &str) -> i64 {
        match self {
            Self::Sqlite(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
            Self::Postgres(pool) => sqlx::query_scalar(sql).fetch_one(pool).await.unwrap(),
        }
    }

    /// The plain SUM over the ledger for one account and resource, in minor
    /// units (as [`TestApp::ledger_sum`]).
    pub async fn ledger_sum(&self, account: &str, resource: &str) -> i64 {
        self.scalar_i64(&ledger_sum_sql(account, resource)).await
    }
}

impl ServeProcess {
    /// SIGTERM, then the exit status (within 30 s).
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        self.terminate();
        self.wait_for_exit(std::time::Duration::from_secs(30)).await
    }
}

/// One integer from a query run directly on the database at `url` (for
/// databases no [`TestApp`] serves, such as one `tally migrate` creates).
pub async fn scalar_i64_at(backend: Backend, url: &str, sql: &str) -> i64 {
    match backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(url).await.unwrap();
            let value = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
            pool.close().await;
            value
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(url).await.unwrap();
            let value = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
            pool.close().await;
            value
        }
    }
}

/// Clears a flag when dropped, even by a panic, so loops waiting on it end.
struct ClearOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// DESIGN.md invariant 4, as a race: posts 40 batches of 25 entries of 1
/// `resource` for `acme` at `occurred_at` while the rollup folds in small
/// batches, and meanwhile asserts that `read` (the `used` an endpoint
/// answers) lies between a plain ledger SUM taken just before it and one
/// just after (entries only grow: a double count exceeds the upper bound, a
/// row hidden between the tail and the totals falls below the lower). Also
/// asserts the rollup folded entries, and reads were taken, while posting
/// went on, so the race was real; then that `read` gives all 1 000 before
/// and after a final rollup and that the totals verify.
pub async fn assert_used_exact_while_posting_and_rolling_up<F, Fut>(
    app: std::sync::Arc<TestApp>,
    resource: &'static str,
    occurred_at: String,
    read: F,
) where
    F: Fn(std::sync::Arc<TestApp>) -> Fut,
    Fut: std::future::Future<Output = i64>,
{
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let posting = std::sync::Arc::new(AtomicBool::new(true));
    let folded = std::sync::Arc::new(AtomicU64::new(0));
    let poster = {
        let (app, posting, folded) = (app.clone(), posting.clone(), folded.clone());
        tokio::spawn(async move {
            let _done = ClearOnDrop(posting);
            for batch in 0..40 {
                if batch == 39 {
                    // On a loaded machine 39 batches can commit before the
                    // rollup's snapshot lets it fold any; wait (bounded) so
                    // the last batch is posted while folding goes on.
                    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
                    while folded.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                }
                let entries: Vec<_> = (0..25)
                    .map(|i| entry_at("acme", resource, "1", &format!("p{batch}-{i}"), &occurred_at))
                    .collect();
                let reply = app.post_entries(serde_json::json!({ "entries": entries })).await;
                assert_eq!(reply.status, 200, "{:?}", reply.body);
            }
        })
    };
    // Adds to `folded` what runs that ended before the posting did folded.
    let roller = {
        let (app, posting, folded) = (app.clone(), posting.clone(), folded.clone());
        tokio::spawn(async move {
            while posting.load(Ordering::SeqCst) {
                let report = app
                    .rollup_with(tally::jobs::rollup::RollupOptions {
                        batch_size: 17,
                        failpoint: None,
                        max_batch_size: None,
                    })
                    .await
                    .unwrap();
                if posting.load(Ordering::SeqCst) {
                    folded.fetch_add(report.entries, Ordering::SeqCst);
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
    };
    let ledger = RawPool::connect(&app).await;
    let (mut samples, mut samples_while_posting) = (0, 0);
    while posting.load(Ordering::SeqCst) || samples < 5 {
        let before = ledger.ledger_sum("acme", resource).await;
        let used = read(app.clone()).await;
        let after = ledger.ledger_sum("acme", resource).await;
        assert!(before <= used && used <= after, "{before} <= {used} <= {after}");
        samples += 1;
        if posting.load(Ordering::SeqCst) {
            samples_while_posting += 1;
        }
    }
    poster.await.unwrap();
    roller.await.unwrap();
    assert!(
        folded.load(Ordering::SeqCst) > 0,
        "the rollup folded entries while the posting went on"
    );
    assert!(samples_while_posting > 0, "used was read while the posting went on");
    assert_eq!(read(app.clone()).await, 1000);
    app.rollup().await;
    assert_eq!(read(app.clone()).await, 1000);
    assert!(app.store.verify_totals().await.unwrap().is_empty());
}

/// A jobs directory with one job: the rollup, every second (for tests that
/// run `tally serve` and need its scheduled rollup to fire soon).
pub fn rollup_every_second_jobs_dir() -> TempDir {
    let jobs = tempfile::tempdir().unwrap();
    std::fs::write(
        jobs.path().join("rollup.toml"),
        "name = \"rollup\"\nschedule = \"* * * * * *\"\nrun = \"rollup\"\n",
    )
    .unwrap();
    jobs
}

/// `count` entries of `amount` for `account` and `resource` at `at`, as one batch body.
pub fn batch_at(account: &str, resource: &str, amount: &str, count: usize, at: &str) -> serde_json::Value {
    let entries: Vec<_> = (0..count)
        .map(|i| entry_at(account, resource, amount, &format!("{resource}-{amount}-{i}"), at))
        .collect();
    serde_json::json!({ "entries": entries })
}

/// A transaction holding PostgreSQL's consume lock of (`account`,
/// `resource`), the key store/postgres.rs takes it by, on a pool of its own
/// (returned too, to watch consumes wait on it).
pub async fn holding_the_consume_lock(
    app: &TestApp,
    account: &str,
    resource: &str,
) -> (sqlx::PgPool, sqlx::Transaction<'static, sqlx::Postgres>) {
    let pool = sqlx::PgPool::connect(&app.database_url).await.unwrap();
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || chr(31) || $2, 7))")
        .bind(account)
        .bind(resource)
        .execute(&mut *holder)
        .await
        .unwrap();
    (pool, holder)
}

/// Returns once a backend of this test's database waits on a lock (polled
/// every 50 ms, at most 10 s; `never` is the failure's message).
pub async fn until_a_backend_waits_on_a_lock(pool: &sqlx::PgPool, never: &str) {
    until_backends_wait_on_locks(pool, 1, never).await;
}

/// Waits (10 s at most, else panics with `never`) until at least `count`
/// sessions of the test's database wait on a lock.
pub async fn until_backends_wait_on_locks(pool: &sqlx::PgPool, count: i64, never: &str) {
    for _ in 0..200 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting >= count {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{never}");
}

/// A transaction that has taken its id and stays open: PostgreSQL's xmin
/// stays at or below it until it ends, so newer transactions' rows wait.
pub async fn transaction_holding_an_id(pool: &sqlx::PgPool) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut open = pool.begin().await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *open)
        .await
        .unwrap();
    open
}
