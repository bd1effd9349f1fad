//! Invariants the database itself keeps, on both engines.

use std::collections::{BTreeSet, HashMap};

use chrono::Utc;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use tally::domain::entry::EntryRules;
use tally::domain::{Amount, EntryFilter, EntryInput};

use crate::both;
use sqlx::Connection;

use crate::helpers::{Backend, TestApp, batch_at, days_ago, entry, entry_at, fresh_database};

both!(
    the_database_refuses_to_update_or_delete_ledger_rows,
    amounts_in_any_spelling_are_stored_exactly_and_read_back_canonical,
    sums_past_two_to_the_53_stay_exact_in_check_series_rollup_and_export,
    a_total_past_64_bits_is_an_error_never_a_wrapped_number,
);

async fn the_database_refuses_to_update_or_delete_ledger_rows(app: TestApp) {
    app.post_entries(entry("acme", "api_requests", "5", "k1")).await;
    let update = app.execute_raw("UPDATE entries SET amount = 6").await;
    let message = update.expect_err("UPDATE must fail").to_string();
    assert!(message.contains("append-only"), "{message}");
    let delete = app.execute_raw("DELETE FROM entries").await;
    assert!(
        delete
            .expect_err("DELETE must fail")
            .to_string()
            .contains("append-only")
    );
    // A replacing insert is a delete and an insert in one line.
    if app.backend == crate::helpers::Backend::Sqlite {
        let by_id = app
            .execute_raw(
                "INSERT OR REPLACE INTO entries (id, account, resource, amount, occurred_at, recorded_at, idempotency_key)
                 SELECT id, account, resource, 999, occurred_at, recorded_at, 'other' FROM entries",
            )
            .await;
        let message = by_id.expect_err("a replace by id must fail").to_string();
        assert!(message.contains("append-only"), "{message}");
        app.execute_raw(
            "REPLACE INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key)
             SELECT account, resource, 999, occurred_at, recorded_at, idempotency_key FROM entries",
        )
        .await
        .expect("a replace by key is skipped");
    } else {
        let upsert = app
            .execute_raw(
                "INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key)
                 SELECT account, resource, 999, occurred_at, recorded_at, idempotency_key FROM entries
                 ON CONFLICT (account, idempotency_key) DO UPDATE SET amount = EXCLUDED.amount",
            )
            .await;
        let message = upsert.expect_err("an upsert must fail").to_string();
        assert!(message.contains("append-only"), "{message}");
        let truncate = app.execute_raw("TRUNCATE entries CASCADE").await;
        assert!(
            truncate
                .expect_err("TRUNCATE must fail")
                .to_string()
                .contains("append-only")
        );
    }
    assert_eq!(
        app.scalar_i64("SELECT CAST(SUM(amount) AS BIGINT) FROM entries").await,
        5
    );
    assert_eq!(app.count_entries().await, 1);
}

/// Canonical decimal text for an amount of `minor` units with `decimals`
/// digits, by integer arithmetic alone (not through `Amount`, whose
/// formatting is under test): no trailing fractional zeros, no `+`.
fn canonical(minor: i64, decimals: u32) -> String {
    let scale = 10u64.pow(decimals);
    let (whole, fraction) = (minor.unsigned_abs() / scale, minor.unsigned_abs() % scale);
    let sign = if minor < 0 { "-" } else { "" };
    let fraction = format!("{fraction:0width$}", width = decimals as usize);
    match fraction.trim_end_matches('0') {
        "" => format!("{sign}{whole}"),
        digits => format!("{sign}{whole}.{digits}"),
    }
}

/// Another spelling of the same amount, as a client may send it: padded
/// with the resource's full fractional digits, with a `+`, or in scientific
/// notation (`150e-2` for 1.5).
fn spelling(minor: i64, decimals: u32, which: usize) -> String {
    let scale = 10u64.pow(decimals);
    let (whole, fraction) = (minor.unsigned_abs() / scale, minor.unsigned_abs() % scale);
    let sign = if minor < 0 { "-" } else { "" };
    match which % 4 {
        0 => canonical(minor, decimals),
        1 if decimals > 0 => format!("{sign}{whole}.{fraction:0width$}", width = decimals as usize),
        2 if minor > 0 => format!("+{}", canonical(minor, decimals)),
        _ => format!("{minor}e-{decimals}"),
    }
}

async fn amounts_in_any_spelling_are_stored_exactly_and_read_back_canonical(app: TestApp) {
    // (resource, decimals): every precision the built-in catalog has.
    let resources = [("api_requests", 0u32), ("agent_minutes", 2)];
    let strategy = proptest::collection::vec(
        (
            0usize..2,
            prop_oneof![-999_999_999_999_999i64..=999_999_999_999_999, -1000i64..=1000],
        ),
        1..40,
    );
    let mut runner = proptest::test_runner::TestRunner::default();
    // Random batches drawn from the strategy; each goes through the real
    // validation and store and must read back as the same canonical text.
    for batch_no in 0..24 {
        let values = strategy.new_tree(&mut runner).unwrap().current();
        let mut expected = Vec::new();
        let mut inputs = Vec::new();
        for (i, (which, minor)) in values.into_iter().enumerate() {
            let (resource, decimals) = resources[which];
            // Amounts are whole units of 10^-decimals below 10^15 in magnitude.
            let minor = if decimals == 0 { minor } else { minor / 1000 };
            if minor == 0 {
                continue;
            }
            let sent = spelling(minor, decimals, i);
            let mut body = entry("prop", resource, &sent, &format!("b{batch_no}-{i}"));
            body["occurred_at"] = serde_json::json!(Utc::now().to_rfc3339());
            inputs.push(serde_json::from_value::<EntryInput>(body).unwrap());
            expected.push((minor, canonical(minor, decimals)));
        }
        if inputs.is_empty() {
            continue;
        }
        let rules = EntryRules {
            catalog: &app.catalog,
            now: Utc::now(),
            late_horizon: chrono::Duration::days(35),
            allow_late: false,
            too_late: tally::domain::entry::BACKFILL,
        };
        let entries = tally::domain::entry::validate_batch(inputs, rules)
            .expect("valid amounts")
            .entries;
        let outcomes = app.store.insert_entries(&entries).await.unwrap();
        let ids: BTreeSet<i64> = outcomes.iter().map(|o| o.id).collect();
        let stored = app
            .store
            .list_entries(&EntryFilter {
                after_id: Some(ids.first().unwrap() - 1),
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        let by_id: HashMap<i64, (i64, String)> = stored
            .iter()
            .map(|e| (e.id, (e.amount.minor(), e.amount.to_string())))
            .collect();
        // Outcomes come in request order (ids need not: PostgreSQL inserts in key order).
        let read: Vec<(i64, String)> = outcomes.iter().map(|o| by_id[&o.id].clone()).collect();
        assert_eq!(read, expected);
    }
}

/// 10 × (10^15 − 1) + 1 = 9 999 999 999 999 991 units: odd and above 2^53, so
/// a sum through f64 anywhere (a float SUM in SQL, a JSON number) would answer
/// …992. And 999 999 999 999 999.99 has no f64 either: sent as a JSON number
/// and parsed through f64 it would become 10^15, which is refused.
async fn sums_past_two_to_the_53_stay_exact_in_check_series_rollup_and_export(app: TestApp) {
    let day = days_ago(2);
    let next = days_ago(1);
    let at = format!("{day}T12:00:00Z");
    let big = app
        .post_entries(batch_at("big", "api_requests", "999999999999999", 10, &at))
        .await;
    assert_eq!(big.status, 200, "{:?}", big.body);
    let one = app.post_entries(batch_at("big", "api_requests", "1", 1, &at)).await;
    assert_eq!(one.status, 200, "{:?}", one.body);
    // Raw text: the test's own serde_json would hold the number as an f64.
    let raw = format!(
        r#"{{"account": "big", "resource": "agent_minutes", "amount": 999999999999999.99,
             "idempotency_key": "m1", "occurred_at": "{at}"}}"#
    );
    let minutes = app
        .request("POST", "/v1/entries", Some(&app.admin_key), Some(raw))
        .await;
    assert_eq!(minutes.status, 200, "{:?}", minutes.body);

    let expected = [
        ("api_requests", "9999999999999991"),
        ("agent_minutes", "999999999999999.99"),
    ];
    for folded in [false, true] {
        if folded {
            assert_eq!(app.rollup().await.entries, 12);
        }
        for (resource, want) in expected {
            let check = app
                .post(
                    "/v1/quota/check",
                    serde_json::json!({"account": "big", "resource": resource, "at": at}),
                )
                .await;
            assert_eq!(check.status, 200, "{:?}", check.body);
            assert_eq!(check.body["used"], want, "check, folded: {folded}");
            let series = app
                .get(&format!(
                    "/v1/accounts/big/timeseries?resource={resource}&granularity=day&from={day}&to={next}"
                ))
                .await;
            assert_eq!(series.body["points"][0]["amount"], want, "series, folded: {folded}");
        }
    }
    assert!(app.store.verify_totals().await.unwrap().is_empty());
    let output = app.cli(&["export", "daily", "--from", &day, "--to", &next]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let csv = String::from_utf8(output.stdout).unwrap();
    assert!(
        csv.contains(&format!("big,api_requests,{day},9999999999999991,11"))
            && csv.contains(&format!("big,agent_minutes,{day},999999999999999.99,1")),
        "{csv}"
    );
}

/// 9 224 entries of 10^15 − 1 units sum past i64::MAX on one day: every read
/// of that total answers an error (500 over HTTP), before and after the
/// rollup, rather than report a wrapped or rounded number. The rollup folds
/// it all the same (see rollup.rs for what that spares everyone else).
async fn a_total_past_64_bits_is_an_error_never_a_wrapped_number(app: TestApp) {
    let day = days_ago(2);
    let at = format!("{day}T12:00:00Z");
    let posted = app
        .post_entries(batch_at("huge", "api_requests", "999999999999999", 9_224, &at))
        .await;
    assert_eq!(posted.status, 200, "{:?}", posted.body);
    for folded in [false, true] {
        if folded {
            app.rollup().await;
            assert!(app.store.verify_totals().await.unwrap().is_empty());
        }
        let check = app
            .post(
                "/v1/quota/check",
                serde_json::json!({"account": "huge", "resource": "api_requests", "at": at}),
            )
            .await;
        assert_eq!(
            (check.status, check.code()),
            (500, "total_too_large"),
            "{:?}",
            check.body
        );
        let message = check.body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("A total past 64 bits"),
            "says where to look: {message}"
        );
        let usage = app.get(&format!("/v1/accounts/huge/usage?at={at}")).await;
        assert_eq!(usage.status, 500, "{:?}", usage.body);
        // The operator's copy names the sum, folded or still in the tail.
        let cli_check = app.cli(&["check", "huge", "api_requests", "--at", &at]);
        let stderr = String::from_utf8_lossy(&cli_check.stderr);
        assert_eq!(cli_check.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("(api_requests used by huge)"),
            "folded: {folded}: {stderr}"
        );
    }
    assert_eq!(app.count_entries().await, 9_224);
    // The exports say the same, whichever connection reads (SQLite's
    // exports have their own).
    for granularity in ["daily", "monthly"] {
        let month = &day[..7];
        let (from, to) = if granularity == "daily" {
            (day.clone(), days_ago(1))
        } else {
            (
                format!("{month}-01"),
                tally::domain::period::Granularity::Month
                    .next(format!("{month}-01").parse().unwrap())
                    .to_string(),
            )
        };
        let export = app.cli(&["export", granularity, "--from", &from, "--to", &to]);
        let stderr = String::from_utf8_lossy(&export.stderr);
        assert!(!export.status.success(), "{granularity}: {stderr}");
        assert!(stderr.contains("passed the 64-bit range"), "{granularity}: {stderr}");
    }
}

#[test]
fn the_two_migration_folders_mirror_each_other() {
    let names = |engine: &str| -> Vec<String> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(engine);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let sqlite = names("sqlite");
    assert!(!sqlite.is_empty());
    assert_eq!(
        sqlite,
        names("postgres"),
        "same versions, same names in migrations/sqlite and migrations/postgres"
    );
}

proptest! {
    #[test]
    fn formatting_then_parsing_an_amount_is_the_identity(minor in -999_999_999_999_999i64..=999_999_999_999_999, decimals in 0u32..=3) {
        prop_assume!(minor != 0);
        let amount = Amount::from_minor(minor / 10i64.pow(decimals), decimals);
        prop_assume!(amount.minor() != 0);
        let parsed = Amount::parse(&amount.to_string(), decimals).unwrap();
        prop_assert_eq!(parsed, amount);
    }
}

/// The day and the month of an instant are UTC's even when the operator's
/// database defaults to another time zone (here UTC+14, where 23:30 UTC is
/// already the next day). PostgreSQL turns instants into dates in the
/// session's `TimeZone`; two guards keep that UTC: sqlx starts every session
/// with `TimeZone=UTC` (a startup parameter, which beats database, role and
/// `postgresql.conf` defaults), and Tally's SQL takes every date
/// `AT TIME ZONE 'UTC'`. Either alone passes this test (review BA found that
/// dropping the second fails nothing); it fails when both go, say with a
/// driver that sets no `TimeZone`.
#[tokio::test]
async fn on_postgres_a_server_in_another_time_zone_still_counts_utc_days_and_months() {
    let Some((url, _)) = fresh_database(Backend::Postgres).await else {
        return;
    };
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "DO $$ BEGIN
             EXECUTE format('ALTER DATABASE %I SET timezone = %L', current_database(), 'Pacific/Kiritimati');
         END $$",
    )
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    let app = TestApp::spawn_on(Backend::Postgres, url, None, None).await;
    assert_eq!(
        app.scalar_i64(
            "SELECT COUNT(*) FROM pg_db_role_setting s JOIN pg_database d ON d.oid = s.setdatabase
             WHERE d.datname = current_database() AND 'TimeZone=Pacific/Kiritimati' = ANY (s.setconfig)"
        )
        .await,
        1,
        "the premise: the database defaults to UTC+14"
    );

    let (day, next, after) = (days_ago(3), days_ago(2), days_ago(1));
    for (amount, key, at) in [
        ("3", "d1", format!("{day}T10:00:00Z")),
        ("7", "d2", format!("{day}T23:30:00Z")),
        ("5", "d3", format!("{next}T00:30:00Z")),
    ] {
        let posted = app.post_entries(entry_at("acme", "llm_tokens", amount, key, &at)).await;
        assert_eq!(posted.status, 200, "{:?}", posted.body);
    }
    // A month boundary needs fixed dates, past the late-arrival horizon.
    app.insert(&[
        ("acme", "api_requests", "1", "m1", "2026-10-31T23:30:00Z"),
        ("acme", "api_requests", "10", "m2", "2026-11-01T00:30:00Z"),
    ])
    .await;

    let late_on_day = format!("{day}T23:45:00Z");
    let reads = [
        ("llm_tokens", late_on_day.as_str(), "10", format!("{day}T00:00:00Z")),
        (
            "api_requests",
            "2026-10-31T23:45:00Z",
            "1",
            "2026-10-01T00:00:00Z".to_owned(),
        ),
    ];
    for folded in [false, true] {
        if folded {
            assert_eq!(app.rollup().await.entries, 5);
        }
        for (resource, at, used, period_start) in &reads {
            let check = app
                .post(
                    "/v1/quota/check",
                    serde_json::json!({"account": "acme", "resource": resource, "at": at}),
                )
                .await;
            assert_eq!(check.status, 200, "{:?}", check.body);
            assert_eq!(
                (&check.body["used"], &check.body["period_start"]),
                (&serde_json::json!(used), &serde_json::json!(period_start)),
                "check of {resource}, folded: {folded}"
            );
        }
        assert_eq!(
            series_points(&app, "llm_tokens", "day", &day, &after).await,
            [(day.clone(), "10".to_owned()), (next.clone(), "5".to_owned())],
            "folded: {folded}"
        );
        assert_eq!(
            series_points(&app, "api_requests", "month", "2026-10-01", "2026-12-01").await,
            [
                ("2026-10-01".to_owned(), "1".to_owned()),
                ("2026-11-01".to_owned(), "10".to_owned())
            ],
            "folded: {folded}"
        );
    }
    assert_eq!(app.daily_total("acme", "llm_tokens", &day).await, 10);
    assert_eq!(app.daily_total("acme", "llm_tokens", &next).await, 5);
    assert_eq!(app.monthly_total("acme", "api_requests", "2026-10-01").await, 1);
    assert_eq!(app.monthly_total("acme", "api_requests", "2026-11-01").await, 10);
    assert!(app.store.verify_totals().await.unwrap().is_empty());

    // A dated consume's window is the UTC day too: 2 more on top of the 10.
    let consumed = app
        .post(
            "/v1/quota/consume",
            serde_json::json!({"account": "acme", "resource": "llm_tokens", "amount": "2",
                               "idempotency_key": "c1", "occurred_at": format!("{day}T23:50:00Z")}),
        )
        .await;
    assert_eq!(consumed.status, 200, "{:?}", consumed.body);
    assert_eq!(consumed.body["used"], "12");
    let output = app.cli(&["export", "daily", "--from", &day, "--to", &after]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let csv = String::from_utf8(output.stdout).unwrap();
    assert!(
        csv.contains(&format!("acme,llm_tokens,{day},12,3\n"))
            && csv.contains(&format!("acme,llm_tokens,{next},5,1\n")),
        "{csv}"
    );
}

/// The points of a timeseries of `acme`, as (start, amount).
async fn series_points(
    app: &TestApp,
    resource: &str,
    granularity: &str,
    from: &str,
    to: &str,
) -> Vec<(String, String)> {
    let reply = app
        .get(&format!(
            "/v1/accounts/acme/timeseries?resource={resource}&granularity={granularity}&from={from}&to={to}"
        ))
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["start"].as_str().unwrap().to_owned(),
                p["amount"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}
