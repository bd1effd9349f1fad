//! When the database is out of reach: every request answers 503
//! `database_unavailable` in the contract's format, nothing is half-written,
//! and the same running app serves again once the database is back.
//!
//! Neither test can use a shared database: PostgreSQL is stopped under the
//! app (on a cluster of its own), and SQLite's file is write-locked by a
//! second connection for as long as the store's busy timeout.

use serde_json::{Value, json};
use sqlx::Connection;
use tally::testing::pg_cluster::PgCluster;

use crate::helpers::{Backend, Reply, TestApp, entry, metric, own_pg_cluster};

const ACCOUNT: &str = "acct-outage";

fn consume_body(key: &str) -> Value {
    json!({"account": ACCOUNT, "resource": "api_requests", "amount": "1", "idempotency_key": key})
}

fn assert_unavailable(reply: &Reply, what: &str) {
    assert_eq!(reply.status, 503, "{what}: {reply:?}");
    assert_eq!(reply.code(), "database_unavailable", "{what}: {reply:?}");
    assert!(
        reply.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {reply:?}"
    );
    assert_eq!(
        reply.headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1"),
        "{what}: {reply:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_requests_answer_503_while_the_server_is_down_and_succeed_once_it_is_back() {
    let Some(cluster) = own_pg_cluster() else { return };
    let url = cluster.create_database().await.expect("a database on the own cluster");
    let app = TestApp::spawn_on(Backend::Postgres, url, None, None).await;
    let before = app.post_entries(entry(ACCOUNT, "api_requests", "5", "before")).await;
    assert_eq!(before.status, 200, "{before:?}");
    let month = chrono::Utc::now().format("%Y-%m").to_string();

    cluster.stop_server().expect("the server stops");

    let reads = [
        format!("/v1/accounts/{ACCOUNT}/usage"),
        format!("/v1/accounts/{ACCOUNT}/entries"),
        format!("/v1/accounts/{ACCOUNT}"),
        format!("/v1/admin/stats?period={month}"),
        format!("/v1/admin/top?resource=api_requests&period={month}"),
    ];
    for path in &reads {
        assert_unavailable(&app.get(path).await, path);
    }
    let posted = app.post_entries(entry(ACCOUNT, "api_requests", "7", "during")).await;
    assert_unavailable(&posted, "POST /v1/entries");
    let checked = app
        .post(
            "/v1/quota/check",
            json!({"account": ACCOUNT, "resource": "api_requests"}),
        )
        .await;
    assert_unavailable(&checked, "POST /v1/quota/check");
    // Eight consumes at once: the consume workers decide them in groups, and
    // every member of a group the database refused gets its answer.
    let consumes = futures_util::future::join_all(
        (0..8).map(|i| app.post("/v1/quota/consume", consume_body(&format!("consume-{i}")))),
    )
    .await;
    for reply in &consumes {
        assert_unavailable(reply, "POST /v1/quota/consume");
    }
    let health = app.request("GET", "/healthz", None, None).await;
    assert_eq!(health.status, 503, "{health:?}");
    assert_eq!(health.headers["retry-after"], "1", "as every 503");
    assert_eq!(health.body["database"], "unavailable", "{health:?}");
    let metrics = app.metrics_text().await;
    assert_eq!(metric(&metrics, "tally_database_up"), Some(0), "{metrics}");
    // A job run that cannot even take its lock has failed, and says so where
    // an operator looks (the rollup's also in what /healthz reads).
    assert!(app.jobs.run("rollup").await.is_err());
    let metrics = app.metrics_text().await;
    assert_eq!(metric(&metrics, "tally_rollup_failures_total"), Some(1), "{metrics}");
    assert!(
        metrics.contains("tally_job_failures_total{job=\"rollup\"} 1"),
        "{metrics}"
    );

    cluster.start_server().expect("the server starts again");

    // The same app, with the same pool, serves again; what was refused was
    // not written, so its retries are new.
    let retried = app.post_entries(entry(ACCOUNT, "api_requests", "7", "during")).await;
    assert_eq!(retried.status, 200, "{retried:?}");
    assert_eq!(retried.body["created"], 1, "{retried:?}");
    for i in 0..8 {
        let reply = app
            .post("/v1/quota/consume", consume_body(&format!("consume-{i}")))
            .await;
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    assert_eq!(app.count_entries().await, 1 + 1 + 8);
    assert_eq!(app.ledger_sum(ACCOUNT, "api_requests").await, 5 + 7 + 8);
    let health = app.request("GET", "/healthz", None, None).await;
    assert_eq!(health.status, 200, "{health:?}");
    let metrics = app.metrics_text().await;
    assert_eq!(metric(&metrics, "tally_database_up"), Some(1), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_writes_answer_503_while_another_process_holds_the_write_lock_and_reads_go_on() {
    let app = TestApp::spawn(Backend::Sqlite).await.expect("SQLite is always there");
    let before = app.post_entries(entry(ACCOUNT, "api_requests", "5", "before")).await;
    assert_eq!(before.status, 200, "{before:?}");

    // Another process's writer: it takes the write lock and keeps it past
    // the store's busy timeout.
    let mut other = sqlx::SqliteConnection::connect(&app.database_url)
        .await
        .expect("a second connection to the file");
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut other)
        .await
        .expect("the write lock is taken");

    // `tally post` meanwhile, in a process of its own (review AQ): it gives
    // up after the same timeout, naming the key that makes a retry safe.
    let cli_post = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["post", ACCOUNT, "api_requests", "1"])
        .env("TALLY_DATABASE_URL", &app.database_url)
        .env_remove("TALLY_PLANS")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tally runs");
    let (posted, consumed) = tokio::join!(
        app.post_entries(entry(ACCOUNT, "api_requests", "7", "during")),
        app.post("/v1/quota/consume", consume_body("consume-during")),
    );
    assert_unavailable(&posted, "POST /v1/entries");
    assert_unavailable(&consumed, "POST /v1/quota/consume");
    let cli_post = cli_post.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&cli_post.stderr);
    assert!(!cli_post.status.success(), "{said}");
    assert!(
        said.contains("the entry may not be recorded: run the same command again with --key cli-")
            && said.contains("(the same key records once)"),
        "{said}"
    );
    // WAL: readers do not wait for a writer.
    let usage = app.get(&format!("/v1/accounts/{ACCOUNT}/usage")).await;
    assert_eq!(usage.status, 200, "{usage:?}");
    let checked = app
        .post(
            "/v1/quota/check",
            json!({"account": ACCOUNT, "resource": "api_requests"}),
        )
        .await;
    assert_eq!(checked.status, 200, "{checked:?}");
    assert_eq!(checked.body["used"], "5", "{checked:?}");

    sqlx::raw_sql("ROLLBACK")
        .execute(&mut other)
        .await
        .expect("the write lock is released");
    other.close().await.ok();

    let retried = app.post_entries(entry(ACCOUNT, "api_requests", "7", "during")).await;
    assert_eq!(retried.status, 200, "{retried:?}");
    assert_eq!(retried.body["created"], 1, "{retried:?}");
    let consumed = app.post("/v1/quota/consume", consume_body("consume-during")).await;
    assert_eq!(consumed.status, 200, "{consumed:?}");
    assert_eq!(app.count_entries().await, 3);
    assert_eq!(app.ledger_sum(ACCOUNT, "api_requests").await, 5 + 7 + 1);
}

/// An address nothing listens on: a port the system just handed out and
/// took back.
fn refused_address() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_commands_and_serve_against_a_refused_port_fail_at_once_naming_the_refused_connection() {
    let address = refused_address();
    let url = format!("postgres://tally:s3cret@{address}/tally");
    for args in [
        &["verify"][..],
        &["export", "daily", "--from", "2026-01-01", "--to", "2026-02-01"],
        &["serve", "--listen", "127.0.0.1:0", "--no-jobs"],
    ] {
        let started = std::time::Instant::now();
        let output = tally_on(&url, args);
        let elapsed = started.elapsed();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}: {stderr}");
        // The pool alone waited its 10 s acquire timeout, then said only
        // "pool timed out while waiting for an open connection".
        assert!(
            elapsed < std::time::Duration::from_secs(5),
            "{args:?} took {elapsed:?}: {stderr}"
        );
        assert!(stderr.contains("Connection refused"), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("postgres://tally:***@{address}/tally")),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("s3cret"), "{args:?}: {stderr}");
    }
}

/// A URL whose Unix socket is not there (a wrong port, most often: the
/// socket is named after it) names the socket it looked for. It used to say
/// only "No such file or directory (os error 2)".
#[test]
fn on_postgres_a_url_naming_a_missing_socket_names_the_socket() {
    let folder = tempfile::tempdir().unwrap();
    let url = format!(
        "postgres://tally@localhost/tally?host={}&port=5999",
        folder.path().display()
    );
    let output = tally_on(&url, &["verify"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    let socket = format!("no PostgreSQL socket at {}/.s.PGSQL.5999", folder.path().display());
    assert!(stderr.contains(&socket), "{stderr}");
    assert!(stderr.contains("check the port"), "{stderr}");
}

/// Review AW: a URL of another scheme (or a capitalised one) was repeated
/// whole in the refusal, its password with it.
#[test]
fn an_unsupported_database_url_is_refused_without_repeating_its_password() {
    for url in ["Postgres://u:SECRETPW@127.0.0.1:1/db", "mysql://u:SECRETPW@h/db"] {
        let output = tally_on(url, &["usage", "acme"]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(stderr.contains("unsupported database URL"), "{stderr}");
        assert!(stderr.contains("u:***@"), "{stderr}");
        assert!(!stderr.contains("SECRETPW"), "{stderr}");
    }
}

/// libpq's socket form without a host (`postgres://USER@/DB?host=DIR`) is
/// refused by sqlx as "empty host": the error gives the form that works,
/// and does not repeat the URL (it may hold a password).
#[test]
fn a_postgres_url_without_a_host_is_told_the_form_that_works() {
    let output = tally_on("postgres://tally:s3cret@/tally?host=/run/postgresql", &["verify"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("empty host") && stderr.contains("postgres://USER@localhost/DB?host=/run/postgresql"),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret"), "{stderr}");
    assert!(!stderr.contains("folder must exist"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_healthz_and_metrics_answer_within_seconds_once_the_server_is_down() {
    // Over TCP: a stopped server refuses connections there, and the pool
    // retries a refused connection until its acquire timeout (a Unix
    // socket that has gone fails at once).
    let Some(cluster) = crate::helpers::own_pg_cluster_from(PgCluster::start_with_tcp) else {
        return;
    };
    let url = cluster.tcp_url("postgres");
    let mut serve = crate::helpers::ServeProcess::start(&url, &["--no-jobs"], &[("TALLY_ADMIN_KEY", "k")]).await;
    let client = reqwest::Client::new();
    let health = client.get(format!("{}/healthz", serve.address())).send().await.unwrap();
    assert_eq!(health.status(), 200);

    cluster.stop_server().expect("the server stops");

    // Kubernetes' probes give up after 1 s by default and Prometheus'
    // scrapes after 10 s: the pool's own wait (10 s then) was past both.
    let started = std::time::Instant::now();
    let health = client.get(format!("{}/healthz", serve.address())).send().await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(health.status(), 503);
    let body: Value = health.json().await.unwrap();
    assert_eq!(body["database"], "unavailable", "{body}");
    assert!(elapsed < std::time::Duration::from_secs(4), "healthz took {elapsed:?}");
    // The log says why, as a direct connection finds it: the pool alone
    // only timed out.
    let logged = serve
        .wait_for_stderr("health check: database unavailable", std::time::Duration::from_secs(5))
        .await
        .unwrap_or_else(|| panic!("no health log line:\n{}", serve.stderr()));
    assert!(logged.contains("Connection refused"), "{logged}");

    let started = std::time::Instant::now();
    let metrics = crate::helpers::scrape_metrics(&client, &serve.address()).await;
    let elapsed = started.elapsed();
    assert_eq!(metric(&metrics, "tally_database_up"), Some(0), "{metrics}");
    assert!(elapsed < std::time::Duration::from_secs(4), "metrics took {elapsed:?}");

    // An ordinary request gets its 503 within a client's usual 5 s timeout:
    // it once waited out the pool's 10 s.
    let started = std::time::Instant::now();
    let checked = client
        .post(format!("{}/v1/quota/check", serve.address()))
        .bearer_auth("k")
        .json(&serde_json::json!({"account": "acme", "resource": "api_requests"}))
        .send()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(checked.status(), 503);
    assert_eq!(checked.headers()["retry-after"], "1");
    assert!(elapsed < std::time::Duration::from_secs(5), "the 503 took {elapsed:?}");
}

/// A server that answers but does not accept connections yet (starting up,
/// recovering after a crash, a standby not yet promoted: SQLSTATE 57P03) is
/// waited for, with one log line saying why, instead of failing the command
/// at once: under a process manager Tally often starts beside its database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_commands_and_serve_wait_for_a_server_that_does_not_accept_connections_yet() {
    let Some(cluster) = own_pg_cluster() else {
        return;
    };
    let cluster = std::sync::Arc::new(cluster);
    let url = cluster.admin_url();
    let waiting = "PostgreSQL does not accept connections yet (the database system is not accepting \
                   connections: Hot standby mode is disabled.); waiting for it, at most 60 s";
    let promote_in = std::time::Duration::from_millis(1500);
    let promote_later = |cluster: &std::sync::Arc<PgCluster>| {
        cluster
            .restart_as_standby_not_accepting_connections()
            .expect("the server restarts as a standby");
        let cluster = cluster.clone();
        std::thread::spawn(move || {
            std::thread::sleep(promote_in);
            cluster.promote().expect("the standby is promoted");
        })
    };

    // A one-off command.
    let promoter = promote_later(&cluster);
    let started = std::time::Instant::now();
    let output = tally_on(&url, &["migrate"]);
    let elapsed = started.elapsed();
    promoter.join().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(elapsed >= promote_in, "migrate returned after {elapsed:?}: {stderr}");
    assert_eq!(stderr.matches(waiting).count(), 1, "{stderr}");

    // The server: it starts once the database does, and serves.
    let promoter = promote_later(&cluster);
    let serve = crate::helpers::ServeProcess::start(&url, &["--no-jobs"], &[("TALLY_ADMIN_KEY", "k")]).await;
    promoter.join().unwrap();
    assert!(serve.stderr().contains(waiting), "{}", serve.stderr());
    assert!(
        serve.stderr().contains("PostgreSQL now accepts connections"),
        "{}",
        serve.stderr()
    );
    let health = reqwest::get(format!("{}/healthz", serve.address())).await.unwrap();
    assert_eq!(health.status(), 200);
    drop(serve);

    // Review AY: a restart. The server first refuses as not ready (57P03,
    // as while shutting down), then is gone for a second (no socket), then
    // accepts. The command waits through the gap: it used to stop waiting,
    // and fail, at the first missing socket after the refusals.
    cluster
        .restart_as_standby_not_accepting_connections()
        .expect("the server restarts as a standby");
    let restarter = {
        let cluster = cluster.clone();
        std::thread::spawn(move || {
            std::thread::sleep(promote_in);
            cluster.stop_server().expect("the server stops");
            std::thread::sleep(std::time::Duration::from_secs(1));
            cluster.start_as_primary().expect("the server starts again");
        })
    };
    let output = tally_on(&url, &["accounts", "show", "acme"]);
    restarter.join().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert_eq!(stderr.matches(waiting).count(), 1, "{stderr}");
}

/// Review BB: a server that answered 57P03 and was then gone until the wait
/// ended was reported by the last failure alone ("no socket", or "did not
/// answer within 0 s"), as if Tally had not waited; the message says it
/// waited, what the server answered, and that it then went away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_server_that_refused_and_then_went_away_is_reported_with_both() {
    let Some(cluster) = own_pg_cluster() else {
        return;
    };
    let cluster = std::sync::Arc::new(cluster);
    cluster
        .restart_as_standby_not_accepting_connections()
        .expect("the server restarts as a standby");
    // The whole start wait (tally::store::postgres::START_WAIT, a minute).
    let started = std::time::Instant::now();
    let mut tally = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["accounts", "show", "acme"])
        .env("TALLY_DATABASE_URL", cluster.admin_url())
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tally runs");
    // The server goes away once Tally has seen it refuse, not after a
    // guessed while (a slow start would find no socket from the outset).
    let reader = {
        let cluster = cluster.clone();
        let pipe = tally.stderr.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            let mut stderr = String::new();
            for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
                if line.contains("does not accept connections yet") && !stderr.contains("does not accept") {
                    cluster.stop_server().expect("the server stops");
                }
                stderr.push_str(&line);
                stderr.push('\n');
            }
            stderr
        })
    };
    let status = tally.wait().unwrap();
    let elapsed = started.elapsed();
    let stderr = reader.join().unwrap();
    assert!(!status.success(), "{stderr}");
    // Less the last poll's quarter second, which would end past it.
    assert!(
        elapsed >= tally::store::postgres::START_WAIT - std::time::Duration::from_secs(1),
        "{elapsed:?}: {stderr}"
    );
    assert!(
        stderr.contains(
            "the PostgreSQL server did not accept connections within 60 s: it answered \"the database system is \
             not accepting connections: Hot standby mode is disabled.\", and later could not be reached (no socket \
             at "
        ),
        "{stderr}"
    );
}

/// Runs `tally ARGS` on the database `url`, warnings and errors only, without
/// colour, and waits for it.
fn tally_on(url: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env("TALLY_DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .output()
        .expect("tally runs")
}

/// Review BO: a statement ended by a PostgreSQL restart or
/// `pg_terminate_backend` (SQLSTATE 57P01) was answered 500 `internal`,
/// which clients do not retry, while consumes caught in the same restart got
/// 503. A consume waiting on its lock when its backend is terminated is now
/// a 503 too, with its Retry-After, and records nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_statement_ended_by_a_terminated_backend_is_answered_503() {
    let Some(app) = TestApp::spawn(Backend::Postgres).await else {
        return;
    };
    let (pool, holder) = crate::helpers::holding_the_consume_lock(&app, "acme", "api_requests").await;
    let consume = app.post(
        "/v1/quota/consume",
        json!({"account": "acme", "resource": "api_requests", "amount": "1", "idempotency_key": "cut-off"}),
    );
    let terminate = async {
        crate::helpers::until_a_backend_waits_on_a_lock(&pool, "the consume never waited on its lock").await;
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .execute(&pool)
        .await
        .unwrap();
    };
    let (reply, ()) = tokio::join!(consume, terminate);
    holder.rollback().await.unwrap();
    assert_eq!(reply.status, 503, "{:?}", reply.body);
    assert_eq!(reply.code(), "database_unavailable", "{:?}", reply.body);
    assert_eq!(reply.headers["retry-after"], "1");
    assert_eq!(app.count_entries().await, 0);
}
