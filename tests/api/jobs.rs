//! Jobs: definitions, manual runs, no overlapping runs, and the operations view.

use std::process::Command;

use serde_json::json;
use tally::jobs::{JobOutcome, JobRunner};
use tally::telemetry::Metrics;

use crate::both;
use crate::helpers::{TestApp, entry};

both!(
    a_job_run_by_name_folds_the_ledger,
    a_run_is_skipped_while_another_process_holds_the_job,
    health_reports_rollup_lag_and_metrics_count_what_happened,
    jobs_list_shows_each_job_and_its_next_run,
);

fn runner(app: &TestApp) -> JobRunner {
    let context = tally::jobs::JobContext {
        store: app.store.clone(),
        catalog: app.catalog.clone(),
        metrics: std::sync::Arc::new(Metrics::default()),
        reports_dir: std::env::temp_dir(),
    };
    JobRunner::new(context, tally::jobs::builtin())
}

async fn a_job_run_by_name_folds_the_ledger(app: TestApp) {
    app.post_entries(entry("acme", "api_requests", "4", "a")).await;
    let outcome = runner(&app).run("rollup").await.unwrap();
    assert!(
        matches!(&outcome, JobOutcome::Ran(s) if s.starts_with("folded ")),
        "{outcome:?}"
    );
    app.rollup().await;
    let today = chrono::Utc::now().date_naive().to_string();
    assert_eq!(app.daily_total("acme", "api_requests", &today).await, 4);
    let unknown = runner(&app).run("nope").await.unwrap_err().to_string();
    assert!(
        unknown.contains("no job named 'nope'; jobs: monthly-reports, rollup"),
        "{unknown}"
    );
    let cli = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["jobs", "run", "rollup", "--database-url", &app.database_url])
        .output()
        .unwrap();
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    assert!(
        String::from_utf8_lossy(&cli.stdout).starts_with("rollup: folded "),
        "{}",
        String::from_utf8_lossy(&cli.stdout)
    );
}

async fn a_run_is_skipped_while_another_process_holds_the_job(app: TestApp) {
    app.post_entries(entry("acme", "api_requests", "4", "a")).await;
    match app.backend {
        crate::helpers::Backend::Postgres => {
            // Another replica holds the job's advisory lock.
            let held = app.store.try_job_lock("rollup").await.unwrap().expect("free at first");
            let outcome = runner(&app).run("rollup").await.unwrap();
            assert!(
                matches!(&outcome, JobOutcome::Skipped(why) if why.contains("another process")),
                "{outcome:?}"
            );
            assert_eq!(
                app.daily_total("acme", "api_requests", &chrono::Utc::now().date_naive().to_string())
                    .await,
                0
            );
            held.release().await;
        }
        crate::helpers::Backend::Sqlite => {
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
    assert!(matches!(runner(&app).run("rollup").await.unwrap(), JobOutcome::Ran(_)));
}

async fn health_reports_rollup_lag_and_metrics_count_what_happened(app: TestApp) {
    // An entry recorded 30 s ago and not folded yet.
    let pool_sql = match app.backend {
        crate::helpers::Backend::Sqlite => format!(
            "INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key) VALUES ('acme', 'api_requests', 1, {0}, {0}, 'old')",
            (chrono::Utc::now() - chrono::Duration::seconds(30)).timestamp_micros()
        ),
        crate::helpers::Backend::Postgres => "INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key) VALUES ('acme', 'api_requests', 1, now() - interval '30 seconds', now() - interval '30 seconds', 'old')".to_owned(),
    };
    app.execute_raw(&pool_sql).await.unwrap();
    let health = app.request("GET", "/healthz", None, None).await;
    let lag = health.body["rollup_lag_seconds"].as_i64().unwrap();
    assert!((30..60).contains(&lag), "lag {lag}");
    app.post_entries(
        json!({"entries": [entry("acme", "api_requests", "1", "a"), entry("acme", "api_requests", "1", "b")]}),
    )
    .await;
    app.rollup().await;
    let health = app.request("GET", "/healthz", None, None).await;
    assert_eq!(health.body["rollup_lag_seconds"], 0);

    let metrics = app
        .client
        .get(format!("{}/metrics", app.address))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("tally_entries_ingested_total 2"), "{metrics}");
    assert!(metrics.contains("tally_rollup_lag_seconds 0"), "{metrics}");
    assert!(metrics.contains("tally_rollup_runs_total"), "{metrics}");
    assert!(metrics.contains("tally_rollup_failures_total"), "{metrics}");
    assert!(metrics.contains("tally_entries_folded_total"), "{metrics}");
    assert!(
        metrics.contains(r#"tally_http_requests_total{route="/v1/entries",method="POST",status="200"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"route="/healthz""#), "{metrics}");
}

async fn jobs_list_shows_each_job_and_its_next_run(app: TestApp) {
    let jobs_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs");
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
    let next = chrono::DateTime::parse_from_rfc3339(next).unwrap();
    let wait = next.signed_duration_since(chrono::Utc::now()).num_seconds();
    assert!((0..=10).contains(&wait), "next run within 10 s: {line}");
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
    let message = format!("{error:#}");
    assert!(
        message.contains("bad.toml") && message.contains("6-field cron"),
        "{message}"
    );
}

#[test]
fn an_empty_jobs_directory_is_refused_rather_than_scheduling_nothing() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("README"), "not a job\n").unwrap();
    let error = tally::jobs::load(Some(dir.path())).unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains("holds no job files") && message.contains("--no-jobs"),
        "{message}"
    );
}
