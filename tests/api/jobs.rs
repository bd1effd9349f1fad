//! Jobs: definitions, manual runs, no overlapping runs, and the operations view.

use std::process::Command;

use chrono::{SubsecRound as _, Timelike as _};
use serde_json::json;
use tally::jobs::{JobOutcome, JobRunner};
use tally::telemetry::Metrics;

use crate::both;
use crate::helpers::{
    Backend, ServeProcess, TestApp, days_ago_at, entry, entry_at, metric, rollup_every_second_jobs_dir,
};

both!(
    requests_to_unknown_paths_share_one_unmatched_metrics_series,
    a_job_run_by_name_folds_the_ledger,
    a_run_is_skipped_while_another_process_holds_the_job,
    a_second_run_in_one_process_is_skipped_while_the_first_is_in_flight,
    jobs_list_shows_each_job_and_its_next_run,
    a_jobs_directory_without_the_rollup_is_accepted_with_a_warning,
    health_reports_rollup_lag_and_metrics_count_what_happened,
    metrics_come_in_the_text_format_the_scraper_asks_for,
    serve_writes_the_reports_of_a_missed_first_at_start,
    serve_warns_at_start_of_a_reports_directory_the_reports_job_cannot_use,
    a_report_run_names_the_partial_files_a_killed_run_left,
    report_runs_started_together_all_end_well_and_write_each_file_once,
);

/// Review AS: on SQLite the job's guard is per process, so runs started
/// together by hand all run; the ones beaten to a file kept it and used to
/// fail, advising an `--overwrite` the job does not take. On PostgreSQL the
/// others are skipped (exit 75).
async fn report_runs_started_together_all_end_well_and_write_each_file_once(app: TestApp) {
    let posted = app.post_entries(entry("acme", "api_requests", "3", "k1")).await;
    assert_eq!(posted.status, 200, "{:?}", posted.body);
    let reports = tempfile::tempdir().unwrap();
    for round in 0..3 {
        let _ = std::fs::remove_dir_all(reports.path().join("out"));
        let runs: Vec<_> = (0..4)
            .map(|_| {
                Command::new(env!("CARGO_BIN_EXE_tally"))
                    .args(["jobs", "run", "monthly-reports"])
                    .env("TALLY_DATABASE_URL", &app.database_url)
                    .env("TALLY_REPORTS_DIR", reports.path().join("out"))
                    .env("RUST_LOG", "warn")
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for run in runs {
            let output = run.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                output.status.success() || output.status.code() == Some(75),
                "round {round}: {:?}: {stderr}",
                output.status
            );
            assert!(!stderr.contains("--overwrite"), "round {round}: {stderr}");
        }
        let files = std::fs::read_dir(reports.path().join("out")).unwrap().count();
        assert_eq!(
            files, 2,
            "round {round}: the monthly totals and the invoices, once each"
        );
    }
}

fn runner(app: &TestApp) -> JobRunner {
    let context = tally::jobs::JobContext {
        store: app.store.clone(),
        catalog: app.catalog.clone(),
        metrics: std::sync::Arc::new(Metrics::default()),
        reports_dir: std::env::temp_dir(),
    };
    JobRunner::new(context, tally::jobs::builtin())
}

/// The number of entries a rollup run's summary says it folded.
fn folded_in(summary: &str) -> u64 {
    summary
        .strip_prefix("folded ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a rollup summary: {summary:?}"))
}

/// Runs the rollup job by name until its runs have folded `expected` entries
/// in all; returns (runs, entries folded). On PostgreSQL one run may fold
/// less: it folds only rows below the cluster-wide xmin, which other tests'
/// transactions hold back for a moment.
async fn run_rollup_job_until_folded(runner: &JobRunner, expected: u64) -> (u64, u64) {
    let (mut runs, mut folded) = (0, 0);
    for _ in 0..400 {
        match runner.run("rollup").await.unwrap() {
            JobOutcome::Ran(summary) | JobOutcome::Idle(summary) => {
                runs += 1;
                folded += folded_in(&summary);
            }
            JobOutcome::Skipped(why) => panic!("nothing else runs the rollup here: {why}"),
        }
        if folded >= expected {
            return (runs, folded);
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("the rollup job folded {folded} of {expected} entries in {runs} runs");
}

/// A pinned instant yesterday (not "now"), so a run that crosses 00:00 UTC
/// reads the day the entry is in.
fn yesterday_noon() -> (String, String) {
    let at = days_ago_at(1, "12:00:00");
    let day = at[..10].to_owned();
    (at, day)
}

async fn a_job_run_by_name_folds_the_ledger(app: TestApp) {
    let (at, day) = yesterday_noon();
    assert_eq!(
        app.post_entries(entry_at("acme", "api_requests", "4", "a", &at))
            .await
            .status,
        200
    );
    let (_, folded) = run_rollup_job_until_folded(&runner(&app), 1).await;
    assert_eq!(folded, 1, "the job folded the entry, once");
    // Read before anything else rolls up: the total is the job's work.
    assert_eq!(app.daily_total("acme", "api_requests", &day).await, 4);
    let unknown = runner(&app).run("nope").await.unwrap_err().to_string();
    assert!(
        unknown.contains("no job named 'nope'; jobs: monthly-reports, rollup"),
        "{unknown}"
    );
    // The CLI twin folds what was posted since.
    assert_eq!(
        app.post_entries(entry_at("acme", "api_requests", "6", "b", &at))
            .await
            .status,
        200
    );
    let mut folded_by_cli = 0;
    for _ in 0..100 {
        let cli = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["jobs", "run", "rollup", "--database-url", &app.database_url])
            .output()
            .unwrap();
        assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
        let stdout = String::from_utf8_lossy(&cli.stdout);
        let summary = stdout
            .trim()
            .strip_prefix("rollup: ")
            .unwrap_or_else(|| panic!("{stdout}"));
        folded_by_cli += folded_in(summary);
        if folded_by_cli > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(folded_by_cli, 1, "tally jobs run rollup folded the second entry");
    assert_eq!(app.daily_total("acme", "api_requests", &day).await, 10);
}

/// A session that keeps a rollup batch from writing its totals until it
/// ends: another writer's lock on SQLite, a lock on `daily_totals` on
/// PostgreSQL (it takes no transaction id, so it holds back no fold point).
enum TotalsBlocker {
    Sqlite(sqlx::SqliteConnection),
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
}

impl TotalsBlocker {
    async fn hold(app: &TestApp) -> Self {
        use sqlx::Connection as _;
        match app.backend {
            Backend::Sqlite => {
                let mut writer = sqlx::SqliteConnection::connect(&app.database_url).await.unwrap();
                sqlx::raw_sql("BEGIN IMMEDIATE").execute(&mut writer).await.unwrap();
                Self::Sqlite(writer)
            }
            Backend::Postgres => {
                let pool = sqlx::PgPool::connect(&app.database_url).await.unwrap();
                let mut holder = pool.begin().await.unwrap();
                sqlx::query("LOCK TABLE daily_totals IN SHARE MODE")
                    .execute(&mut *holder)
                    .await
                    .unwrap();
                let xid: Option<String> = sqlx::query_scalar("SELECT pg_current_xact_id_if_assigned()::text")
                    .fetch_one(&mut *holder)
                    .await
                    .unwrap();
                assert_eq!(xid, None, "a lock alone takes no transaction id");
                Self::Postgres(holder)
            }
        }
    }

    async fn release(self) {
        match self {
            Self::Sqlite(mut writer) => {
                sqlx::raw_sql("ROLLBACK").execute(&mut writer).await.unwrap();
            }
            Self::Postgres(holder) => holder.rollback().await.unwrap(),
        }
    }
}

/// One process runs a job once at a time: a run asked for while another
/// is in flight (held inside its batch) is skipped, named as running in
/// this process, and the run in flight then finishes its work. The drained
/// guards of `a_run_is_skipped_while_another_process_holds_the_job` do not show that a run holds its own.
async fn a_second_run_in_one_process_is_skipped_while_the_first_is_in_flight(app: TestApp) {
    app.insert(&[("acme", "api_requests", "3", "a", "2026-05-01T12:00:00Z")])
        .await;
    app.until_every_row_is_foldable().await;
    let runner = std::sync::Arc::new(runner(&app));
    let blocker = TotalsBlocker::hold(&app).await;
    let first = {
        let runner = runner.clone();
        tokio::spawn(async move { runner.run("rollup").await })
    };
    let mut running = Vec::new();
    for _ in 0..400 {
        running = runner.running();
        if !running.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(running, ["rollup"], "the first run holds its guard while in flight");

    let second = runner.run("rollup").await.unwrap();
    assert!(
        matches!(&second, JobOutcome::Skipped(why) if why == "job 'rollup' is already running in this process"),
        "{second:?}"
    );
    assert!(!first.is_finished(), "the first run is still held in its batch");
    blocker.release().await;
    let first = first.await.unwrap().unwrap();
    assert!(
        matches!(&first, JobOutcome::Ran(summary) if folded_in(summary) == 1),
        "{first:?}"
    );
    assert_eq!(app.daily_total("acme", "api_requests", "2026-05-01").await, 3);
    assert!(runner.running().is_empty());
}

async fn a_run_is_skipped_while_another_process_holds_the_job(app: TestApp) {
    let (at, day) = yesterday_noon();
    assert_eq!(
        app.post_entries(entry_at("acme", "api_requests", "4", "a", &at))
            .await
            .status,
        200
    );
    match app.backend {
        Backend::Postgres => {
            // Another replica holds the job's advisory lock.
            let held = app.store.try_job_lock("rollup").await.unwrap().expect("free at first");
            let outcome = runner(&app).run("rollup").await.unwrap();
            assert!(
                matches!(&outcome, JobOutcome::Skipped(why) if why.contains("another process")),
                "{outcome:?}"
            );
            assert_eq!(app.daily_total("acme", "api_requests", &day).await, 0);
            // By hand, a skip is not a success: a script's next step may read
            // what the other run has not finished writing.
            let by_hand = app.cli(&["jobs", "run", "rollup"]);
            let stderr = String::from_utf8_lossy(&by_hand.stderr);
            assert_eq!(by_hand.status.code(), Some(75), "{stderr}");
            assert!(
                stderr.contains("rollup: skipped: job 'rollup' is running in another process; it is not done yet"),
                "{stderr}"
            );
            assert_eq!(app.daily_total("acme", "api_requests", &day).await, 0);
            held.release().await;
        }
        Backend::Sqlite => {
            // One process: the in-process guard keeps a second run out.
            let runner = std::sync::Arc::new(runner(&app));
            let guards = runner.drain().await;
            let outcome = runner.run("rollup").await.unwrap();
            assert!(
                matches!(&outcome, JobOutcome::Skipped(why) if why.contains("already running")),
                "{outcome:?}"
            );
            drop(guards);
        }
    }
    // Drained for shutdown: a tick that fires afterwards starts nothing.
    let drained = runner(&app);
    drop(drained.drain().await);
    let late = drained.run("rollup").await.unwrap();
    assert!(
        matches!(&late, JobOutcome::Skipped(why) if why.contains("shutting down")),
        "{late:?}"
    );
    assert!(matches!(
        runner(&app).run("rollup").await.unwrap(),
        JobOutcome::Ran(_) | JobOutcome::Idle(_)
    ));
}

/// API.md promises "Prometheus text format": a scraper that does not ask
/// for OpenMetrics (curl, older agents) gets the classic format, in which a
/// counter's TYPE line names its `_total` samples; Prometheus, which asks,
/// gets OpenMetrics. Both once got OpenMetrics.
async fn metrics_come_in_the_text_format_the_scraper_asks_for(app: TestApp) {
    app.post_entries(entry("acme", "api_requests", "1", "a")).await;
    let scrape = |accept: Option<&'static str>| {
        let mut request = app.client.get(format!("{}/metrics", app.address));
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
            (content_type, response.text().await.unwrap())
        }
    };
    let (content_type, classic) = scrape(None).await;
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert!(
        classic.contains("# TYPE tally_entries_ingested_total counter\n"),
        "{classic}"
    );
    assert!(classic.contains("# HELP tally_entries_ingested_total "), "{classic}");
    assert!(classic.contains("# TYPE tally_database_up gauge\n"), "{classic}");
    assert!(!classic.contains("# EOF"), "{classic}");
    assert_eq!(metric(&classic, "tally_entries_ingested_total"), Some(1), "{classic}");

    // What Prometheus 2 and 3 send.
    let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
                      text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (content_type, open) = scrape(Some(prometheus)).await;
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(open.contains("# TYPE tally_entries_ingested counter\n"), "{open}");
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert_eq!(metric(&open, "tally_entries_ingested_total"), Some(1), "{open}");
}

async fn health_reports_rollup_lag_and_metrics_count_what_happened(app: TestApp) {
    let runner = app.jobs.clone();
    // An entry recorded 30 s ago and not folded yet.
    let pool_sql = match app.backend {
        Backend::Sqlite => format!(
            "INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key) VALUES ('acme', 'api_requests', 1, {0}, {0}, 'old')",
            (chrono::Utc::now() - chrono::Duration::seconds(30)).timestamp_micros()
        ),
        Backend::Postgres => "INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key) VALUES ('acme', 'api_requests', 1, now() - interval '30 seconds', now() - interval '30 seconds', 'old')".to_owned(),
    };
    app.execute_raw(&pool_sql).await.unwrap();
    let health = app.request("GET", "/healthz", None, None).await;
    let lag = health.body["rollup_lag_seconds"].as_i64().unwrap();
    assert!((30..60).contains(&lag), "lag {lag}");
    app.post_entries(
        json!({"entries": [entry("acme", "api_requests", "1", "a"), entry("acme", "api_requests", "1", "b")]}),
    )
    .await;
    let before = app.metrics_text().await;
    assert_eq!(metric(&before, "tally_rollup_runs_total"), Some(0), "{before}");
    assert_eq!(metric(&before, "tally_entries_folded_total"), Some(0), "{before}");
    // The served app's own rollup job: what it does shows in this app's metrics.
    let (runs, folded) = run_rollup_job_until_folded(&runner, 3).await;
    assert_eq!(folded, 3);
    let health = app.request("GET", "/healthz", None, None).await;
    assert_eq!(health.body["rollup_lag_seconds"], 0);

    let metrics = app.metrics_text().await;
    assert!(runs >= 1);
    assert_eq!(metric(&metrics, "tally_rollup_runs_total"), Some(runs), "{metrics}");
    assert_eq!(metric(&metrics, "tally_entries_folded_total"), Some(3), "{metrics}");
    assert_eq!(metric(&metrics, "tally_rollup_failures_total"), Some(0), "{metrics}");
    // Every job's failure counter is there at 0 before any failure, so that
    // increase() sees the first one.
    for job in ["rollup", "monthly-reports"] {
        assert!(
            metrics.contains(&format!(r#"tally_job_failures_total{{job="{job}"}} 0"#)),
            "{metrics}"
        );
    }
    assert_eq!(metric(&metrics, "tally_entries_ingested_total"), Some(2), "{metrics}");
    assert_eq!(metric(&metrics, "tally_rollup_lag_seconds"), Some(0), "{metrics}");
    assert!(
        metrics.contains(r#"tally_http_requests_total{route="/v1/entries",method="POST",status="200"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"route="/healthz""#), "{metrics}");
    // A method a client invents is counted as "other", not as a new series.
    app.request("BREW", "/healthz", None, None).await;
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains(r#"method="other""#) && !metrics.contains("BREW"),
        "{metrics}"
    );

    // A run the database fails (its cursor table gone for a moment) counts as
    // a failure, not as a run.
    app.execute_raw("ALTER TABLE rollup_cursor RENAME TO rollup_cursor_away")
        .await
        .unwrap();
    let failed = runner.run("rollup").await;
    app.execute_raw("ALTER TABLE rollup_cursor_away RENAME TO rollup_cursor")
        .await
        .unwrap();
    assert!(failed.is_err(), "{failed:?}");
    let health = app.request("GET", "/healthz", None, None).await;
    assert_eq!(health.status, 200, "serving still works: {health:?}");
    assert_eq!(health.body["status"], "degraded", "{health:?}");
    assert_eq!(health.body["rollup_failures_in_a_row"], 1, "{health:?}");
    let metrics = app.metrics_text().await;
    assert_eq!(metric(&metrics, "tally_rollup_failures_total"), Some(1), "{metrics}");
    assert_eq!(metric(&metrics, "tally_rollup_failures_in_a_row"), Some(1), "{metrics}");
    assert_eq!(metric(&metrics, "tally_rollup_runs_total"), Some(runs), "{metrics}");
    assert_eq!(metric(&metrics, "tally_entries_folded_total"), Some(3), "{metrics}");
    assert!(
        metrics.contains(r#"tally_job_failures_total{job="rollup"} 1"#),
        "{metrics}"
    );
    // A good run clears it.
    runner.run("rollup").await.expect("the rollup runs again");
    let health = app.request("GET", "/healthz", None, None).await;
    assert_eq!(health.body["status"], "ok", "{health:?}");
    assert_eq!(health.body["rollup_failures_in_a_row"], 0, "{health:?}");
}

async fn jobs_list_shows_each_job_and_its_next_run(app: TestApp) {
    let jobs_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs");
    // Listed to the second: the bounds are whole seconds too.
    let before = chrono::Utc::now().trunc_subsecs(0);
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "jobs",
            "list",
            "--jobs",
            jobs_dir.to_str().unwrap(),
            "--database-url",
            &app.database_url,
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("rollup"))
        .expect("the rollup job is listed");
    assert!(line.contains("*/10 * * * * *"), "{line}");
    let next = line.split_whitespace().last().unwrap();
    let next = chrono::DateTime::parse_from_rfc3339(next).unwrap().to_utc();
    let after = chrono::Utc::now();
    // The process reads its clock at some instant between `before` and
    // `after`; the next run of */10 is the first 10-second mark after it.
    assert_eq!(next.second() % 10, 0, "{line}");
    assert!(
        before < next && next <= after + chrono::Duration::seconds(10),
        "{before} < {next} <= {after} + 10 s: {line}"
    );
    // Which schedule is in force is said: a service started elsewhere than
    // beside its jobs/ ran the built-in schedule unsaid.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("jobs from the job files in {}", jobs_dir.display())),
        "{stderr}"
    );
    let elsewhere = tempfile::tempdir().unwrap();
    let builtin = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["jobs", "list", "--database-url", &app.database_url])
        .env_remove("TALLY_JOBS")
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&builtin.stderr);
    assert!(stderr.contains("jobs from the built-in schedule"), "{stderr}");
}

#[test]
fn a_job_file_with_a_bad_schedule_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.toml"),
        "name = \"rollup\"\nschedule = \"every ten seconds\"\nrun = \"rollup\"\n",
    )
    .unwrap();
    let error = tally::jobs::load(Some(dir.path())).unwrap_err();
    let message = tally::telemetry::cause_chain(&error);
    assert!(
        message.contains("bad.toml") && message.contains("is not a cron of 6 fields, or 7 with a year"),
        "{message}"
    );
}

/// A valid cron for a date that never comes (February 31st) would leave the
/// job idle without a word; `jobs list` already refused it, now loading does.
#[test]
fn a_job_file_whose_schedule_never_fires_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("never.toml"),
        "name = \"rollup\"\nschedule = \"0 0 0 31 2 *\"\nrun = \"rollup\"\n",
    )
    .unwrap();
    let error = tally::jobs::load(Some(dir.path())).unwrap_err();
    let message = tally::telemetry::cause_chain(&error);
    assert!(
        message.contains("never.toml") && message.contains("never fires"),
        "{message}"
    );
}

/// Job files that could only be mistakes: a nameless job, `overwrite` on the
/// rollup (which never rewrites), and two files naming one job (both named).
#[test]
fn job_files_with_no_name_a_misplaced_overwrite_or_one_name_twice_are_refused() {
    for (files, expected) in [
        (
            &[("a.toml", "name = \" \"\nschedule = \"0 * * * * *\"\nrun = \"rollup\"\n")][..],
            vec!["a.toml", "name is empty"],
        ),
        (
            &[(
                "a.toml",
                "name = \"rollup\"\nschedule = \"0 * * * * *\"\nrun = \"rollup\"\noverwrite = true\n",
            )][..],
            vec!["a.toml", "report jobs only"],
        ),
        (
            &[
                (
                    "a.toml",
                    "name = \"rollup\"\nschedule = \"0 * * * * *\"\nrun = \"rollup\"\n",
                ),
                (
                    "b.toml",
                    "name = \"rollup\"\nschedule = \"30 * * * * *\"\nrun = \"rollup\"\n",
                ),
            ][..],
            vec!["a.toml", "b.toml", "both define job 'rollup'"],
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let message = tally::telemetry::cause_chain(&tally::jobs::load(Some(dir.path())).unwrap_err());
        for part in expected {
            assert!(message.contains(part), "{part:?} in {message}");
        }
    }
}

#[test]
fn an_empty_jobs_directory_is_refused_rather_than_scheduling_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("README"), "not a job\n").unwrap();
    let error = tally::jobs::load(Some(dir.path())).unwrap_err();
    let message = tally::telemetry::cause_chain(&error);
    assert!(
        message.contains("holds no job files") && message.contains("--no-jobs"),
        "{message}"
    );
}

/// Counts the sessions waiting for a lock on `daily_totals` in the test's database.
const WAITING_ON_THE_TOTALS: &str = "SELECT COUNT(*) FROM pg_locks AS l JOIN pg_class AS c ON c.oid = l.relation
     WHERE l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND c.relname = 'daily_totals' AND NOT l.granted";

/// Starts `serve` (rollup every second, `args` added) and stops its first
/// rollup run inside its batch, behind a lock on the daily totals held by the
/// blocker returned: the run is in flight until it is released.
async fn serve_with_a_rollup_run_blocked_in_its_batch(app: &TestApp, args: &[&str]) -> (ServeProcess, TotalsBlocker) {
    let jobs = rollup_every_second_jobs_dir();
    let mut all_args = vec!["--jobs", jobs.path().to_str().unwrap()];
    all_args.extend_from_slice(args);
    let serve = ServeProcess::start(&app.database_url, &all_args, &[("TALLY_ADMIN_KEY", "k")]).await;

    let holder = TotalsBlocker::hold(app).await;
    app.insert(&[
        ("acme", "api_requests", "3", "a", "2026-05-01T12:00:00Z"),
        ("acme", "api_requests", "4", "b", "2026-05-01T13:00:00Z"),
    ])
    .await;
    let mut waiting = 0;
    for _ in 0..400 {
        waiting = app.scalar_i64(WAITING_ON_THE_TOTALS).await;
        if waiting > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(waiting, 1, "a scheduled rollup run is blocked inside its batch");
    (serve, holder)
}

/// The wait for the job in flight is bounded by `--shutdown-grace` (counted
/// from the signal): a run that cannot end (a stalled database, a lock held
/// for good) is left, said in the log, and its batch is rolled back for the
/// next run to fold. It used to keep the process up for as long as the lock
/// was held, with nothing in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_shutdown_leaves_a_rollup_run_that_outlasts_the_grace() {
    let Some(app) = TestApp::spawn(Backend::Postgres).await else {
        return;
    };
    let (mut serve, holder) = serve_with_a_rollup_run_blocked_in_its_batch(&app, &["--shutdown-grace", "2"]).await;

    let asked = std::time::Instant::now();
    serve.terminate();
    let status = serve.wait_for_exit(std::time::Duration::from_secs(20)).await;
    let took = asked.elapsed();
    assert!(status.success(), "{status:?}:\n{}", serve.stderr());
    // The grace (2 s), then up to 5 s for the pool to close while the left
    // run still holds a connection, and room for a busy machine.
    assert!(
        took < std::time::Duration::from_secs(12),
        "stopped {took:?} after SIGTERM with a grace of 2 s:\n{}",
        serve.stderr()
    );
    let log = serve.stderr();
    assert!(
        log.contains("for the job run in flight: rollup")
            && log.contains("stopping without the job run in flight (rollup)"),
        "{log}"
    );
    assert!(!log.contains("jobs stopped"), "{log}");

    holder.release().await;
    // The left batch was rolled back; the next run folds it.
    app.rollup().await;
    assert_eq!(app.daily_total("acme", "api_requests", "2026-05-01").await, 7);
    assert!(app.store.verify_totals().await.unwrap().is_empty());
}

/// DESIGN.md (Jobs): on shutdown `serve` waits for the job in flight (within
/// `--shutdown-grace`, 30 s here). A lock
/// this test holds on the daily totals stops a scheduled rollup inside its
/// batch (after it chose its rows, where it writes them), so the run is
/// certainly in flight when SIGTERM comes; the process must then stay up
/// until the run can finish, and exit with the batch committed. Were the
/// run dropped at shutdown, its transaction would roll back and the totals
/// stay empty. PostgreSQL only: there the waiting run shows in `pg_locks`;
/// SQLite shows no waiter, and its busy timeout would fail the run instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_shutdown_waits_for_the_rollup_run_in_flight() {
    let Some(app) = TestApp::spawn(Backend::Postgres).await else {
        return;
    };
    let (mut serve, holder) = serve_with_a_rollup_run_blocked_in_its_batch(&app, &[]).await;

    serve.terminate();
    serve
        .wait_for_stderr("shutdown requested", std::time::Duration::from_secs(10))
        .await
        .expect("the process saw SIGTERM");
    // The HTTP side stops first; once it has, only the wait for the job
    // keeps the process alive.
    let port = serve.address().rsplit(':').next().unwrap().to_owned();
    for _ in 0..400 {
        if std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(serve.is_running(), "exited with a run in flight:\n{}", serve.stderr());
    assert!(!serve.stderr().contains("jobs stopped"), "{}", serve.stderr());
    assert_eq!(app.scalar_i64(WAITING_ON_THE_TOTALS).await, 1, "the run still waits");

    holder.release().await;
    let status = serve.wait_for_exit(std::time::Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}:\n{}", serve.stderr());
    assert!(serve.stderr().contains("jobs stopped"), "{}", serve.stderr());
    assert_eq!(
        app.daily_total("acme", "api_requests", "2026-05-01").await,
        7,
        "the run in flight finished and committed before the process exited"
    );
    assert!(app.store.oldest_unfolded().await.unwrap().is_none());
    assert!(app.store.verify_totals().await.unwrap().is_empty());
}

/// The rollup may run elsewhere (another replica, `tally rollup` from cron),
/// so a directory without it is accepted, but said out loud: otherwise the
/// totals silently fall behind.
async fn a_jobs_directory_without_the_rollup_is_accepted_with_a_warning(app: TestApp) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs/monthly-reports.toml"),
        dir.path().join("monthly-reports.toml"),
    )
    .unwrap();
    let output = app.cli(&["jobs", "list", "--jobs", dir.path().to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("monthly-reports"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("runs the rollup"), "{stderr}");
    let with_rollup = app.cli(&["jobs", "list", "--jobs", concat!(env!("CARGO_MANIFEST_DIR"), "/jobs")]);
    assert!(with_rollup.status.success(), "{with_rollup:?}");
    assert!(!String::from_utf8_lossy(&with_rollup.stderr).contains("runs the rollup"));
}

/// The reports directory holds September's reports but not last month's:
/// the run on the 1st was missed (the server down then). `serve` writes the
/// missing months at start instead of waiting for the next 1st (a month
/// later) as it once did.
async fn serve_writes_the_reports_of_a_missed_first_at_start(app: TestApp) {
    let reports = tempfile::tempdir().unwrap();
    let last_month = tally::jobs::reports::previous_month(chrono::Utc::now());
    let older = last_month - chrono::Months::new(2);
    for report in ["monthly", "invoice"] {
        let name = format!("{report}-{}.csv", older.format("%Y-%m"));
        std::fs::write(reports.path().join(name), "kept\n").unwrap();
    }
    let mut serve = ServeProcess::start(
        &app.database_url,
        &[],
        &[("TALLY_REPORTS_DIR", reports.path().to_str().unwrap())],
    )
    .await;
    let ran = serve
        .wait_for_stderr(
            &format!("invoice-{}.csv] as of", last_month.format("%Y-%m")),
            std::time::Duration::from_secs(30),
        )
        .await;
    assert!(ran.is_some(), "{}", serve.stderr());
    assert!(serve.stderr().contains("a run was missed"), "{}", serve.stderr());
    assert!(!serve.stderr().contains("will fail"), "{}", serve.stderr());
    for month in [older + chrono::Months::new(1), last_month] {
        for report in ["monthly", "invoice"] {
            let path = reports.path().join(format!("{report}-{}.csv", month.format("%Y-%m")));
            assert!(path.exists(), "{} missing:\n{}", path.display(), serve.stderr());
        }
    }
    assert!(serve.stop().await.success());
}

/// Review R: a reports directory that is a file (or cannot be written) used
/// to go unheard of until 00:05 on the 1st. `serve` says so at start, and
/// serves all the same.
async fn serve_warns_at_start_of_a_reports_directory_the_reports_job_cannot_use(app: TestApp) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("reports");
    std::fs::write(&file, "not a folder").unwrap();
    let mut serve = ServeProcess::start(&app.database_url, &[], &[("TALLY_REPORTS_DIR", file.to_str().unwrap())]).await;
    let warned = serve
        .wait_for_stderr("will fail at its next run", std::time::Duration::from_secs(10))
        .await;
    let line = warned.unwrap_or_else(|| panic!("no warning:\n{}", serve.stderr()));
    assert!(line.contains("job monthly-reports will fail"), "{line}");
    assert!(line.contains("is a file, not a folder"), "{line}");
    let health = reqwest::get(format!("{}/healthz", serve.address())).await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(serve.stop().await.success());
}

/// A run killed outright (kill -9) leaves its temp file in the reports
/// directory; later runs once passed it by in silence. Only old ones are
/// named: a young one may belong to a run in progress.
async fn a_report_run_names_the_partial_files_a_killed_run_left(app: TestApp) {
    let reports = tempfile::tempdir().unwrap();
    let left = reports.path().join(".tally-export-Ab12Cd");
    let young = reports.path().join(".tally-export-Ef34Gh");
    for path in [&left, &young] {
        std::fs::write(path, "account,resource\n").unwrap();
    }
    let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    std::fs::File::options()
        .write(true)
        .open(&left)
        .unwrap()
        .set_modified(two_hours_ago)
        .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["jobs", "run", "monthly-reports"])
        .env("TALLY_DATABASE_URL", &app.database_url)
        .env("TALLY_REPORTS_DIR", reports.path())
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{} is a partial report left by a run that was killed",
            left.display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("Ef34Gh"), "{stderr}");
    assert!(left.exists(), "named, not removed");
}

/// Requests to paths no route matches are counted under one `route="unmatched"`
/// series, never under the raw path: a scanner probing random paths must not
/// add a metrics series per path for as long as the process lives.
async fn requests_to_unknown_paths_share_one_unmatched_metrics_series(app: TestApp) {
    app.request("GET", "/no-such-route-a1b2c3", None, None).await;
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains(r#"route="unmatched",method="GET",status="404""#) && !metrics.contains("no-such-route-a1b2c3"),
        "{metrics}"
    );
}
