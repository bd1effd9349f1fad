//! Opening a database that is already migrated: a read-only role can run the
//! commands that only read, and a database migrated by a newer Tally is
//! refused in words that say what to do.

use sqlx::Connection as _;

use crate::both;
use crate::helpers::{Backend, TestApp, entry, fresh_database};

both!(a_database_migrated_by_a_newer_tally_is_refused_naming_the_way_out);

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A version this binary lacks in `_sqlx_migrations`, as a newer Tally
/// leaves it: every command refuses the database, saying why and what to do
/// (sqlx's own words were "migration 9999 was previously applied but is
/// missing in the resolved migrations").
async fn a_database_migrated_by_a_newer_tally_is_refused_naming_the_way_out(app: TestApp) {
    let checksum = match app.backend {
        Backend::Sqlite => "X'00'",
        Backend::Postgres => r"'\x00'::bytea",
    };
    app.execute_raw(&format!(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from a newer tally', TRUE, {checksum}, 0)"
    ))
    .await
    .expect("a version from the future is recorded");
    for args in [&["verify"][..], &["migrate"], &["keys", "list"]] {
        let output = app.cli(args);
        let stderr = text(&output.stderr);
        assert!(!output.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains("migrated by a newer Tally (it holds migration 9999"),
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains("restore a backup"), "{args:?}: {stderr}");
        assert!(!stderr.contains("resolved migrations"), "{args:?}: {stderr}");
    }
}

/// A new login role (`prefix_N`) that may only SELECT Tally's tables: its
/// name, the test database's URL with it as the user, and a connection of
/// the database's owner.
async fn select_only_role(app: &TestApp, prefix: &str) -> (String, String, sqlx::PgConnection) {
    let role = format!("{prefix}_{}", rand::random::<u32>());
    let mut owner = sqlx::PgConnection::connect(&app.database_url).await.unwrap();
    for statement in [
        format!("CREATE ROLE {role} LOGIN"),
        format!("GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"),
        // PostgreSQL 14 and older grant CREATE on public to everyone.
        format!("REVOKE CREATE ON SCHEMA public FROM PUBLIC, {role}"),
    ] {
        sqlx::raw_sql(&statement).execute(&mut owner).await.unwrap();
    }
    let url = app.database_url.replacen("tally@", &format!("{role}@"), 1);
    assert_ne!(url, app.database_url);
    (role, url, owner)
}

/// A reporting role with SELECT only, then the same role with
/// `default_transaction_read_only = on`: every migration is applied, so
/// opening the database writes nothing (no lock, no `CREATE TABLE IF NOT
/// EXISTS`), and the reads run. Each used to fail with "permission denied
/// for schema public" or "cannot execute CREATE TABLE in a read-only
/// transaction".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_select_only_role_exports_verifies_and_reads_usage() {
    let Some(app) = TestApp::spawn(Backend::Postgres).await else {
        return;
    };
    let day = crate::helpers::days_ago(1);
    let posted = app
        .post_entries(crate::helpers::entry_at(
            "acme",
            "api_requests",
            "3",
            "k1",
            &format!("{day}T10:00:00Z"),
        ))
        .await;
    assert_eq!(posted.status, 200, "{posted:?}");
    let posted = app.post_entries(entry("acme", "api_requests", "2", "k2")).await;
    assert_eq!(posted.status, 200, "{posted:?}");
    app.rollup().await;

    let (role, url, mut owner) = select_only_role(&app, "reporter").await;
    let tomorrow = crate::helpers::days_ago(-1);
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .env("TALLY_DATABASE_URL", &url)
            .env_remove("TALLY_PLANS")
            .env("RUST_LOG", "warn")
            .output()
            .expect("tally runs")
    };
    for read_only in [false, true] {
        if read_only {
            sqlx::raw_sql(&format!("ALTER ROLE {role} SET default_transaction_read_only = on"))
                .execute(&mut owner)
                .await
                .unwrap();
        }
        let export = run(&["export", "daily", "--from", &day, "--to", &tomorrow]);
        let stdout = text(&export.stdout);
        assert!(
            export.status.success(),
            "read_only={read_only}: {}",
            text(&export.stderr)
        );
        assert!(stdout.contains(&format!("acme,api_requests,{day},3")), "{stdout}");
        let verify = run(&["verify"]);
        assert!(
            verify.status.success(),
            "read_only={read_only}: {}",
            text(&verify.stderr)
        );
        let usage = run(&["usage", "acme"]);
        assert!(usage.status.success(), "read_only={read_only}: {}", text(&usage.stderr));
        // A write is still refused, by PostgreSQL, in its words.
        let posted = run(&["post", "acme", "api_requests", "1"]);
        assert!(!posted.status.success(), "read_only={read_only}");
        // A catalog with a resource new to the database: its digits cannot
        // be recorded by this role, which is said, and the read goes on.
        let dir = tempfile::tempdir().unwrap();
        let plans = dir.path().join("plans.toml");
        let extra = format!(
            "{}\n[resources.gpu_seconds]\ndecimals = 3\n",
            tally::domain::catalog::BUILTIN_CATALOG_TOML
        );
        std::fs::write(&plans, extra).unwrap();
        let with_new = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["usage", "acme"])
            .env("TALLY_DATABASE_URL", &url)
            .env("TALLY_PLANS", &plans)
            .env("RUST_LOG", "warn")
            .output()
            .expect("tally runs");
        assert!(
            with_new.status.success(),
            "read_only={read_only}: {}",
            text(&with_new.stderr)
        );
        assert!(
            text(&with_new.stderr).contains("cannot record the fractional digits of gpu_seconds: ")
                && text(&with_new.stderr).contains(if read_only { "read-only" } else { "permission denied" }),
            "read_only={read_only}: {}",
            text(&with_new.stderr)
        );
    }
    // Review AT: a role granted SELECT before migration 0021 cannot read
    // resource_digits; its reads go on, saying what is unchecked and why.
    sqlx::raw_sql(&format!("REVOKE SELECT ON resource_digits FROM {role}"))
        .execute(&mut owner)
        .await
        .unwrap();
    let ungranted = run(&["usage", "acme"]);
    assert!(ungranted.status.success(), "{}", text(&ungranted.stderr));
    assert!(
        text(&ungranted.stderr).contains("grant this role SELECT on resource_digits"),
        "{}",
        text(&ungranted.stderr)
    );
    owner.close().await.ok();
}

/// A reporting role granted SELECT before migration 0022 cannot read
/// totals_repairs: its reads of `used` still run, as they do without
/// resource_digits (review AT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_role_granted_before_0022_still_reads_usage_and_checks() {
    let Some(app) = TestApp::spawn(Backend::Postgres).await else {
        return;
    };
    let posted = app.post_entries(entry("acme", "api_requests", "2", "k1")).await;
    assert_eq!(posted.status, 200, "{posted:?}");
    let (role, url, mut owner) = select_only_role(&app, "reporter").await;
    sqlx::raw_sql(&format!("REVOKE SELECT ON totals_repairs FROM {role}"))
        .execute(&mut owner)
        .await
        .unwrap();
    for args in [&["usage", "acme"][..], &["check", "acme", "api_requests"]] {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .env("TALLY_DATABASE_URL", &url)
            .env_remove("TALLY_PLANS")
            .env("RUST_LOG", "warn")
            .output()
            .expect("tally runs");
        assert!(output.status.success(), "{args:?}: {}", text(&output.stderr));
    }
    owner.close().await.ok();
}

/// `serve` as a reporting role granted SELECT before migration 0022: it
/// cannot see a repair, so it keeps no sum behind `used` past its next look
/// at the count (a second): a check after another process repaired the
/// totals answers from the repaired ones, and the refusal is said once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_role_granted_before_0022_keeps_no_sum_past_a_second() {
    let Some(app) = TestApp::spawn(Backend::Postgres).await else {
        return;
    };
    let entries: Vec<_> = (0..30)
        .map(|i| entry("acme", "ai_generations", "1", &format!("gen-{i}")))
        .collect();
    assert_eq!(
        app.post_entries(serde_json::json!({ "entries": entries })).await.status,
        200
    );
    app.rollup().await;
    app.execute_raw("UPDATE monthly_totals SET amount = 5 WHERE account = 'acme'")
        .await
        .unwrap();
    let (role, url, mut owner) = select_only_role(&app, "reporter").await;
    sqlx::raw_sql(&format!("REVOKE SELECT ON totals_repairs FROM {role}"))
        .execute(&mut owner)
        .await
        .unwrap();
    let key = app.key(tally::domain::Role::Admin, None).await;
    let serve = crate::helpers::ServeProcess::start(&url, &["--no-jobs"], &[]).await;
    let client = reqwest::Client::new();
    let check = || async {
        let reply = client
            .post(format!("{}/v1/quota/check", serve.address()))
            .bearer_auth(&key)
            .json(&serde_json::json!({"account": "acme", "resource": "ai_generations", "amount": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(reply.status(), 200);
        let body: serde_json::Value = reply.json().await.unwrap();
        body["used"].as_str().unwrap_or_default().to_owned()
    };
    assert_eq!(check().await, "5", "read from the wrong total");

    let repaired = app.cli(&["verify", "--repair"]);
    assert_eq!(repaired.status.code(), Some(0), "{repaired:?}");
    let repaired_at = std::time::Instant::now();
    loop {
        let used = check().await;
        if used == "30" {
            break;
        }
        assert_eq!(used, "5");
        assert!(
            repaired_at.elapsed() < std::time::Duration::from_millis(2500),
            "a role refused the repairs count kept a sum read before the repair"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let warned = serve
        .stderr()
        .matches("grant this role SELECT on totals_repairs")
        .count();
    assert_eq!(warned, 1, "{}", serve.stderr());
    owner.close().await.ok();
}

/// `serve` as a role granted its tables (reads and writes) before migration
/// 0022: a consume of a rated resource (the multi-statement path) looks at
/// the repairs count inside its transaction; the refused look must not abort
/// that transaction (each look, once a second, answered 500: "current
/// transaction is aborted").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_role_granted_before_0022_still_consumes_a_rated_resource() {
    let Some(app) = TestApp::spawn(Backend::Postgres).await else {
        return;
    };
    let (role, url, mut owner) = select_only_role(&app, "writer").await;
    for statement in [
        format!("GRANT INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"),
        format!("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}"),
        format!("REVOKE SELECT ON totals_repairs FROM {role}"),
    ] {
        sqlx::raw_sql(&statement).execute(&mut owner).await.unwrap();
    }
    let key = app.key(tally::domain::Role::Admin, None).await;
    let serve = crate::helpers::ServeProcess::start(&url, &["--no-jobs"], &[]).await;
    let client = reqwest::Client::new();
    for i in 0..2 {
        if i > 0 {
            // Past the interval: the next consume looks again.
            tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        }
        let reply = client
            .post(format!("{}/v1/quota/consume", serve.address()))
            .bearer_auth(&key)
            .json(
                &serde_json::json!({"account": "acme", "resource": "api_requests", "amount": 1,
                                       "idempotency_key": format!("rated-{i}")}),
            )
            .send()
            .await
            .unwrap();
        let status = reply.status();
        let body = reply.text().await.unwrap();
        assert_eq!(status, 200, "consume {i}: {body}\n{}", serve.stderr());
    }
    owner.close().await.ok();
}

/// `serve` as a role whose transactions are read-only (a standby is the
/// same): with a key in the database it starts and answers, since it writes
/// nothing to start; with none it cannot store the bootstrap key, and says
/// that and what to do (it used to fail on any database with "cannot execute
/// INSERT in a read-only transaction", naming no step).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_serve_starts_read_only_when_keys_exist_and_says_why_it_cannot_without() {
    let Some(app) = TestApp::spawn(Backend::Postgres).await else {
        return;
    };
    let (role, url, mut owner) = select_only_role(&app, "standby").await;
    sqlx::raw_sql(&format!("ALTER ROLE {role} SET default_transaction_read_only = on"))
        .execute(&mut owner)
        .await
        .unwrap();

    let mut refused = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["serve", "--listen", "127.0.0.1:0", "--no-jobs"])
        .env("TALLY_DATABASE_URL", &url)
        .env_remove("TALLY_ADMIN_KEY")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while refused.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            refused.kill().ok();
            panic!("serve did not stop on a read-only database with no key");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let output = refused.wait_with_output().unwrap();
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("the database has no API key, and creating the bootstrap admin key failed")
            && stderr.contains("read-only")
            && stderr.contains("tally keys create --role admin"),
        "{stderr}"
    );

    app.key(tally::domain::Role::Admin, None).await;
    let serve = crate::helpers::ServeProcess::start(&url, &["--no-jobs"], &[]).await;
    let health = reqwest::get(format!("{}/healthz", serve.address())).await.unwrap();
    assert_eq!(health.status(), 200);
    owner.close().await.ok();
}

/// A database made by a Tally before migration 0009 (overrides without a
/// history), then opened by this one: an override set then applies at every
/// earlier instant, as it did under the binary that set it, so checks of
/// past instants and closed months' bills keep their answers; changes made
/// after the upgrade start when they are made. 0009 seeded each override as
/// of its last change, so the plan's limit used to take over before it
/// (found by review AG: a November bill changed on upgrade).
async fn an_override_set_before_its_history_was_kept_applies_at_earlier_instants_after_the_upgrade(backend: Backend) {
    let Some((url, dir)) = fresh_database(backend).await else {
        return;
    };
    let engine = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    let mut before_0009 = sqlx::migrate::Migrator::new(std::path::Path::new(&format!(
        "{}/migrations/{engine}",
        env!("CARGO_MANIFEST_DIR")
    )))
    .await
    .unwrap();
    before_0009.migrations = before_0009
        .migrations
        .iter()
        .filter(|m| m.version <= 8)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    // 5 llm_tokens a day (free's are 1 000), last set on 20 November.
    match backend {
        Backend::Sqlite => {
            let options: sqlx::sqlite::SqliteConnectOptions = url.parse().unwrap();
            let mut conn = sqlx::SqliteConnection::connect_with(&options.create_if_missing(true))
                .await
                .unwrap();
            before_0009.run(&mut conn).await.unwrap();
            let set_at = chrono::DateTime::parse_from_rfc3339("2026-11-20T10:00:00Z")
                .unwrap()
                .timestamp_micros();
            sqlx::query(
                "INSERT INTO account_overrides (account, resource, limit_amount, enforcement, limit_window, expires_at, updated_at)
                 VALUES ('old', 'llm_tokens', 5, 'hard', 'day', NULL, ?)",
            )
            .bind(set_at)
            .execute(&mut conn)
            .await
            .unwrap();
        }
        Backend::Postgres => {
            let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
            before_0009.run(&mut conn).await.unwrap();
            sqlx::query(
                "INSERT INTO account_overrides (account, resource, limit_amount, enforcement, limit_window, expires_at, updated_at)
                 VALUES ('old', 'llm_tokens', 5, 'hard', 'day', NULL, '2026-11-20T10:00:00Z')",
            )
            .execute(&mut conn)
            .await
            .unwrap();
        }
    }
    let app = TestApp::spawn_on(backend, url, dir, None).await;
    let limit_at = async |at: &str| {
        let reply = app
            .post(
                "/v1/quota/check",
                serde_json::json!({"account": "old", "resource": "llm_tokens", "at": at}),
            )
            .await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        reply.body["limit"].as_str().unwrap().to_owned()
    };
    assert_eq!(limit_at("2026-11-10T12:00:00Z").await, "5", "before it was last set");
    assert_eq!(limit_at("2026-11-25T12:00:00Z").await, "5");
    // A change after the upgrade starts when it is made.
    let changed = chrono::Utc::now() - chrono::Duration::minutes(10);
    let put = app
        .put_override_since("old", "llm_tokens", serde_json::json!({"limit": "7"}), changed)
        .await;
    assert_eq!(put.status, 200, "{:?}", put.body);
    let before_change = (changed - chrono::Duration::minutes(1)).to_rfc3339();
    assert_eq!(limit_at(&before_change).await, "5");
    assert_eq!(limit_at(&chrono::Utc::now().to_rfc3339()).await, "7");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_an_override_set_before_its_history_was_kept_applies_at_earlier_instants_after_the_upgrade() {
    an_override_set_before_its_history_was_kept_applies_at_earlier_instants_after_the_upgrade(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_an_override_set_before_its_history_was_kept_applies_at_earlier_instants_after_the_upgrade() {
    an_override_set_before_its_history_was_kept_applies_at_earlier_instants_after_the_upgrade(Backend::Postgres).await;
}
