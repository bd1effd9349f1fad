//! A database restored from a backup into a new home keeps counting: what is
//! posted after the restore folds, and counts toward quotas, with what came
//! before it.
//!
//! On PostgreSQL a logical dump carries the old cluster's transaction ids (the
//! ledger's `tx_id`, the rollup cursor). Restored into a cluster whose ids are
//! behind them, new entries would sort below the cursor and count nowhere, so
//! Tally refuses such a database and names the repair (docs/operations.md,
//! "Restoring a PostgreSQL dump"). That test runs on a cluster of its own: the
//! repair restarts it. SQLite numbers rows in commit order itself, so a copy
//! works anywhere; its test checks the copy the docs recommend.

use std::process::{Command, Output};

use serde_json::Value;

use crate::helpers::{Backend, TestApp, entry, own_pg_cluster, scalar_i64_at};

/// Runs the `tally` binary against `url`.
fn tally_at(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .env("TALLY_DATABASE_URL", url)
        .env_remove("TALLY_PLANS")
        .env("RUST_LOG", "warn")
        .output()
        .expect("tally runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Three entries of 5 folded, one of 5 left in the tail: 20 api_requests.
async fn post_twenty_with_a_tail(app: &TestApp) {
    for key in ["one", "two", "three"] {
        let posted = app.post_entries(entry("acme", "api_requests", "5", key)).await;
        assert_eq!(posted.status, 200, "{posted:?}");
    }
    app.rollup().await;
    let tail = app.post_entries(entry("acme", "api_requests", "5", "tail")).await;
    assert_eq!(tail.status, 200, "{tail:?}");
}

/// Posts 7 more on the restored copy at `url`, rolls up, and checks that
/// every entry counts: 27 used, and the totals equal to the ledger.
async fn assert_the_copy_keeps_counting(backend: Backend, url: &str) {
    let posted = tally_at(url, &["post", "acme", "api_requests", "7", "--key", "after-restore"]);
    assert!(posted.status.success(), "{}", stderr(&posted));
    let rolled = tally_at(url, &["rollup"]);
    assert!(rolled.status.success(), "{}", stderr(&rolled));
    let checked = tally_at(url, &["check", "acme", "api_requests"]);
    assert!(checked.status.success(), "{}", stderr(&checked));
    let check: Value = serde_json::from_slice(&checked.stdout).unwrap();
    assert_eq!(check["used"], "27", "{check}");
    let folded = scalar_i64_at(backend, url, "SELECT CAST(SUM(amount) AS BIGINT) FROM daily_totals").await;
    assert_eq!(folded, 27, "everything is folded");
    let verified = tally_at(url, &["verify"]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_dump_restored_into_a_cluster_behind_its_ids_is_refused_until_they_move_past() {
    let Some(source) = TestApp::spawn(Backend::Postgres).await else {
        return;
    };
    let Some(target) = own_pg_cluster() else { return };
    // The shared cluster is well past a fresh one's ids (≈ 750) after a few
    // tests; make sure of it: 2 000 transactions of nothing.
    let pool = sqlx::PgPool::connect(&source.database_url).await.unwrap();
    sqlx::raw_sql("DO $$ BEGIN FOR i IN 1..2000 LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    post_twenty_with_a_tail(&source).await;

    let dump_file = tempfile::NamedTempFile::new().unwrap();
    let dumped = Command::new(target.bin_dir().join("pg_dump"))
        .arg("--no-owner")
        .arg(format!("--dbname={}", source.database_url))
        .arg(format!("--file={}", dump_file.path().display()))
        .output()
        .unwrap();
    assert!(dumped.status.success(), "{}", stderr(&dumped));
    let restored = target.create_database().await.unwrap();
    let loaded = Command::new(target.bin_dir().join("psql"))
        .args(["--no-psqlrc", "--quiet", "-v", "ON_ERROR_STOP=1"])
        .arg(format!("--dbname={restored}"))
        .arg(format!("--file={}", dump_file.path().display()))
        .output()
        .unwrap();
    assert!(loaded.status.success(), "{}", stderr(&loaded));

    // Every command refuses it, saying why and what to run; nothing is written.
    for args in [
        &["rollup"][..],
        &["post", "acme", "api_requests", "7", "--key", "too-soon"],
    ] {
        let refused = tally_at(&restored, args);
        assert!(!refused.status.success(), "{args:?}");
        let said = stderr(&refused);
        assert!(
            said.contains("restored from a dump into another cluster") && said.contains("pg_resetwal -e 1 "),
            "{args:?}: {said}"
        );
    }
    assert_eq!(
        scalar_i64_at(Backend::Postgres, &restored, "SELECT COUNT(*) FROM entries").await,
        4
    );

    // The repair the message names, then the copy counts everything.
    target.set_transaction_epoch(1).expect("pg_resetwal -e 1");
    assert_the_copy_keeps_counting(Backend::Postgres, &restored).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_a_copy_made_by_vacuum_into_keeps_counting_what_is_posted_after() {
    let Some(source) = TestApp::spawn(Backend::Sqlite).await else {
        return;
    };
    post_twenty_with_a_tail(&source).await;
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.db");
    let pool = sqlx::SqlitePool::connect(&source.database_url).await.unwrap();
    sqlx::query("VACUUM INTO ?")
        .bind(copy.display().to_string())
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let url = format!("sqlite://{}", copy.display());
    assert_the_copy_keeps_counting(Backend::Sqlite, &url).await;
}
