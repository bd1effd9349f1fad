//! CSV exports, invoices, admin stats and the monthly reports job.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::json;

use crate::both;
use crate::helpers::{Backend, TestApp, entry};

/// The invoice CSV header as API.md fixes it, spelled out here rather than
/// taken from the code under test.
const INVOICE_HEADER_OF_API_MD: [&str; 8] = [
    "account",
    "plan",
    "resource",
    "used",
    "included",
    "overage",
    "unit_price",
    "amount_due",
];

both!(
    an_export_stopped_by_ctrl_c_or_sigterm_leaves_no_file_behind,
    an_entries_export_matches_the_ledger_row_by_row_with_rfc4180_quoting,
    an_entries_export_takes_from_its_first_instant_and_stops_before_to,
    daily_and_monthly_exports_match_an_independent_sum_of_the_ledger,
    an_entries_export_reimports_to_the_same_ledger,
    an_as_of_export_is_reproducible_after_late_entries_and_reversals,
    an_invoice_prorates_a_mid_month_plan_change_and_bills_soft_overage,
    admin_stats_and_top_accounts_describe_a_known_dataset,
    sums_that_leave_64_bits_on_the_way_but_end_within_them_read_alike_and_stats_add_past_them,
    an_unfolded_tail_past_64_bits_is_added_exactly_and_a_total_past_them_is_named_once,
    the_monthly_reports_job_writes_each_report_once,
    bad_export_requests_fail_clearly_and_leave_no_file,
    exports_write_fractional_and_negative_amounts_exactly_for_any_decimals,
    an_export_file_gets_the_umask_permissions_and_a_closed_pipe_is_not_an_error,
    progress_is_written_as_lines_when_stderr_is_not_a_terminal,
    the_output_dash_is_stdout_a_symlink_is_followed_and_a_device_is_refused,
    a_totals_export_takes_unfolded_entries_from_its_first_instant_and_stops_before_to,
    an_as_of_export_counts_an_entry_recorded_at_that_very_instant,
    top_accounts_with_equal_usage_come_in_account_order,
);

fn read_csv(path: &Path) -> Vec<Vec<String>> {
    let mut reader = csv::ReaderBuilder::new().has_headers(false).from_path(path).unwrap();
    reader
        .records()
        .map(|r| r.unwrap().iter().map(str::to_owned).collect())
        .collect()
}

fn export(app: &TestApp, dir: &Path, name: &str, args: &[&str]) -> Vec<Vec<String>> {
    let path = dir.join(name);
    let mut all = args.to_vec();
    all.extend(["-o", path.to_str().unwrap()]);
    let output = app.cli(&all);
    assert!(
        output.status.success(),
        "{:?}: {}",
        args,
        String::from_utf8_lossy(&output.stderr)
    );
    read_csv(&path)
}

async fn seed(app: &TestApp) {
    app.insert(&[
        ("acme", "api_requests", "100", "a1", "2026-09-01T00:00:00Z"),
        ("acme", "api_requests", "250", "a2", "2026-09-01T23:59:59.999Z"),
        ("acme", "agent_minutes", "1.25", "a3", "2026-09-02T10:00:00Z"),
        ("globex", "api_requests", "7", "g1", "2026-09-30T23:59:59Z"),
        ("globex", "api_requests", "-2", "g2", "2026-10-01T00:00:00Z"),
        ("acme", "storage_bytes", "4096", "a4", "2026-08-31T12:00:00Z"),
    ])
    .await;
}

async fn an_entries_export_matches_the_ledger_row_by_row_with_rfc4180_quoting(app: TestApp) {
    seed(&app).await;
    let tricky = json!({"note": "commas, \"quotes\"\nand a newline", "n": 1});
    let posted = app
        .post_entries(
            json!({"account": "acme", "resource": "llm_tokens", "amount": "5", "idempotency_key": "meta",
                             "metadata": tricky, "source": "svc,1"}),
        )
        .await;
    assert_eq!(posted.status, 200);
    // A reversal, so the reverses column holds an id for one row.
    let a2 = app.get("/v1/accounts/acme/entries?limit=1000").await.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["idempotency_key"] == "a2")
        .unwrap()["id"]
        .as_i64()
        .unwrap();
    let reversal = app
        .post(
            &format!("/v1/entries/{a2}/reversal"),
            json!({"idempotency_key": "undo-a2", "reason": "double count"}),
        )
        .await;
    assert_eq!(reversal.status, 200, "{:?}", reversal.body);
    let dir = tempfile::tempdir().unwrap();
    let rows = export(
        &app,
        dir.path(),
        "entries.csv",
        &["export", "entries", "--from", "2020-01-01", "--to", "2030-01-01"],
    );
    assert_eq!(
        rows[0],
        [
            "id",
            "account",
            "resource",
            "amount",
            "occurred_at",
            "recorded_at",
            "idempotency_key",
            "source",
            "reverses",
            "metadata"
        ]
    );
    let listed = app.get("/v1/accounts/acme/entries?limit=1000").await.body["entries"]
        .as_array()
        .unwrap()
        .clone();
    let others = app.get("/v1/accounts/globex/entries?limit=1000").await.body["entries"]
        .as_array()
        .unwrap()
        .clone();
    let mut ledger: Vec<_> = listed.into_iter().chain(others).collect();
    ledger.sort_by_key(|e| e["id"].as_i64().unwrap());
    assert_eq!(rows.len() - 1, ledger.len());
    assert_eq!(
        ledger.iter().filter(|e| e["reverses"] == a2).count(),
        1,
        "the data holds the reversal"
    );
    let instant = |raw: &str| chrono::DateTime::parse_from_rfc3339(raw).unwrap_or_else(|e| panic!("{raw:?}: {e}"));
    for (row, entry) in rows[1..].iter().zip(&ledger) {
        assert_eq!(row[0], entry["id"].to_string());
        assert_eq!(row[1], entry["account"].as_str().unwrap());
        assert_eq!(row[2], entry["resource"].as_str().unwrap());
        assert_eq!(row[3], entry["amount"].as_str().unwrap());
        assert_eq!(instant(&row[4]), instant(entry["occurred_at"].as_str().unwrap()));
        assert_eq!(instant(&row[5]), instant(entry["recorded_at"].as_str().unwrap()));
        assert_eq!(row[6], entry["idempotency_key"].as_str().unwrap());
        assert_eq!(row[7], entry["source"].as_str().unwrap_or(""));
        let reverses = entry["reverses"].as_i64().map(|id| id.to_string()).unwrap_or_default();
        assert_eq!(row[8], reverses, "{row:?}");
        let metadata = if row[9].is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&row[9]).unwrap()
        };
        assert_eq!(metadata, entry["metadata"]);
    }
    let filtered = export(
        &app,
        dir.path(),
        "acme.csv",
        &[
            "export",
            "entries",
            "--from",
            "2026-09-01",
            "--to",
            "2026-10-01",
            "--account",
            "acme",
            "--resource",
            "api_requests",
        ],
    );
    let keys: Vec<_> = filtered[1..].iter().map(|r| r[6].as_str()).collect();
    // The reversal takes the instant of what it reverses, so it falls in the range.
    assert_eq!(keys, ["a1", "a2", "undo-a2"]);
}

async fn an_entries_export_takes_from_its_first_instant_and_stops_before_to(app: TestApp) {
    seed(&app).await;
    let dir = tempfile::tempdir().unwrap();
    // No filter: g1 (2026-09-30T23:59:59Z) is the range's last row, g2 (exactly
    // 2026-10-01T00:00:00Z) the first past it; a4 (2026-08-31) is before it.
    let rows = export(
        &app,
        dir.path(),
        "september.csv",
        &["export", "entries", "--from", "2026-09-01", "--to", "2026-10-01"],
    );
    let mut keys: Vec<_> = rows[1..].iter().map(|r| r[6].as_str()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["a1", "a2", "a3", "g1"]);
}

async fn daily_and_monthly_exports_match_an_independent_sum_of_the_ledger(app: TestApp) {
    seed(&app).await;
    app.rollup().await;
    // More entries after the rollup: the export must count the unfolded tail too.
    app.insert(&[
        ("acme", "api_requests", "1", "late1", "2026-09-01T08:00:00Z"),
        ("zeta", "llm_tokens", "9", "z1", "2026-09-15T08:00:00Z"),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let daily = export(
        &app,
        dir.path(),
        "daily.csv",
        &["export", "daily", "--from", "2026-09-01", "--to", "2026-10-01"],
    );
    assert_eq!(daily[0], ["account", "resource", "day", "amount", "entries"]);
    assert_eq!(
        daily[1..].to_vec(),
        [
            ["acme", "agent_minutes", "2026-09-02", "1.25", "1"],
            ["acme", "api_requests", "2026-09-01", "351", "3"],
            ["globex", "api_requests", "2026-09-30", "7", "1"],
            ["zeta", "llm_tokens", "2026-09-15", "9", "1"],
        ]
        .map(|r| r.map(str::to_owned).to_vec())
    );
    // Each exported row against a plain SUM and COUNT over the ledger for its
    // bucket, and all rows together against every entry of the range: a
    // bucket missing from the file would leave the counts short.
    let day = |raw: &str| raw.parse::<chrono::NaiveDate>().unwrap();
    assert_export_matches_the_ledger(&app, &daily, |d| {
        let start = day(d);
        (start, start.succ_opt().unwrap())
    })
    .await;
    let (sept, oct) = (day("2026-09-01"), day("2026-10-01"));
    let exported: i64 = daily[1..].iter().map(|r| r[4].parse::<i64>().unwrap()).sum();
    assert_eq!(exported, ledger_bucket(&app, None, sept, oct).await.1);
    let monthly = export(
        &app,
        dir.path(),
        "monthly.csv",
        &["export", "monthly", "--from", "2026-08", "--to", "2026-11"],
    );
    assert_eq!(monthly[0], ["account", "resource", "month", "amount", "entries"]);
    let months: BTreeMap<(String, String, String), (String, String)> = monthly[1..]
        .iter()
        .map(|r| ((r[0].clone(), r[1].clone(), r[2].clone()), (r[3].clone(), r[4].clone())))
        .collect();
    assert_eq!(
        months[&("acme".into(), "api_requests".into(), "2026-09".into())],
        ("351".into(), "3".into())
    );
    assert_eq!(
        months[&("acme".into(), "storage_bytes".into(), "2026-08".into())],
        ("4096".into(), "1".into())
    );
    assert_eq!(
        months[&("globex".into(), "api_requests".into(), "2026-10".into())],
        ("-2".into(), "1".into())
    );
    assert_eq!(months.len(), 6);
    assert_export_matches_the_ledger(&app, &monthly, |m| {
        let start = day(&format!("{m}-01"));
        (start, start + chrono::Months::new(1))
    })
    .await;
    let exported: i64 = monthly[1..].iter().map(|r| r[4].parse::<i64>().unwrap()).sum();
    assert_eq!(
        exported,
        ledger_bucket(&app, None, day("2026-08-01"), day("2026-11-01")).await.1
    );
}

/// (SUM of amounts in minor units, COUNT) of the ledger rows of
/// `account_resource` (all when None) that occurred in [from, to), by SQL.
async fn ledger_bucket(
    app: &TestApp,
    account_resource: Option<(&str, &str)>,
    from: chrono::NaiveDate,
    to: chrono::NaiveDate,
) -> (i64, i64) {
    let bound = |d: chrono::NaiveDate| {
        let instant = d.and_hms_opt(0, 0, 0).unwrap().and_utc();
        match app.backend {
            // SQLite stores instants as microseconds since 1970.
            Backend::Sqlite => instant.timestamp_micros().to_string(),
            Backend::Postgres => format!("TIMESTAMPTZ '{}'", instant.to_rfc3339()),
        }
    };
    let filter = match account_resource {
        Some((account, resource)) => format!("account = '{account}' AND resource = '{resource}' AND"),
        None => String::new(),
    };
    let range = format!(
        "{filter} occurred_at >= {} AND occurred_at < {}",
        bound(from),
        bound(to)
    );
    (
        app.scalar_i64(&format!(
            "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM entries WHERE {range}"
        ))
        .await,
        app.scalar_i64(&format!("SELECT COUNT(*) FROM entries WHERE {range}"))
            .await,
    )
}

/// Every row of a daily or monthly export (`account,resource,bucket,amount,entries`)
/// equals the ledger's SUM and COUNT for its bucket; `bucket` maps the third
/// column to its [start, end).
async fn assert_export_matches_the_ledger(
    app: &TestApp,
    rows: &[Vec<String>],
    bucket: impl Fn(&str) -> (chrono::NaiveDate, chrono::NaiveDate),
) {
    assert!(rows.len() > 1, "rows to compare: {rows:?}");
    for row in &rows[1..] {
        let (from, to) = bucket(&row[2]);
        let (sum, count) = ledger_bucket(app, Some((&row[0], &row[1])), from, to).await;
        let amount = tally::domain::Amount::parse(&row[3], app.catalog.decimals(&row[1]))
            .unwrap_or_else(|e| panic!("{row:?}: {e}"))
            .minor();
        assert_eq!((amount, row[4].parse::<i64>().unwrap()), (sum, count), "{row:?}");
    }
}

async fn an_entries_export_reimports_to_the_same_ledger(app: TestApp) {
    seed(&app).await;
    let ids = app
        .insert(&[("acme", "llm_tokens", "40", "to-undo", "2026-09-05T00:00:00Z")])
        .await;
    let reversal = app
        .post(
            &format!("/v1/entries/{}/reversal", ids[0]),
            json!({"idempotency_key": "undo", "reason": "x, \"y\""}),
        )
        .await;
    assert_eq!(reversal.status, 200);
    let dir = tempfile::tempdir().unwrap();
    let args = ["export", "entries", "--from", "2020-01-01", "--to", "2030-01-01"];
    let original = export(&app, dir.path(), "a.csv", &args);

    let Some(copy) = TestApp::spawn(app.backend).await else {
        return;
    };
    let imported = copy.cli(&["import", "--allow-late", dir.path().join("a.csv").to_str().unwrap()]);
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    let again = export(&copy, dir.path(), "b.csv", &args);
    // Identical but for ids (and recorded_at), which the new ledger assigns.
    let content = |rows: &[Vec<String>]| -> BTreeMap<String, Vec<String>> {
        let key_of_id: BTreeMap<&str, &str> = rows[1..].iter().map(|r| (r[0].as_str(), r[6].as_str())).collect();
        rows[1..]
            .iter()
            .map(|r| {
                let reverses = key_of_id.get(r[8].as_str()).copied().unwrap_or("").to_owned();
                (
                    r[6].clone(),
                    vec![
                        r[1].clone(),
                        r[2].clone(),
                        r[3].clone(),
                        r[4].clone(),
                        r[7].clone(),
                        reverses,
                        r[9].clone(),
                    ],
                )
            })
            .collect()
    };
    assert_eq!(content(&original), content(&again));
    assert_eq!(original.len(), again.len());
}

async fn an_as_of_export_is_reproducible_after_late_entries_and_reversals(app: TestApp) {
    let ids = app
        .insert(&[("acme", "api_requests", "10", "a", "2026-09-03T00:00:00Z")])
        .await;
    app.insert(&[("acme", "api_requests", "5", "b", "2026-09-04T00:00:00Z")])
        .await;
    // An override in force at T, removed afterwards.
    let set = app
        .put_admin(
            "/v1/accounts/acme/overrides/llm_tokens",
            json!({"limit": "5000", "enforcement": "soft"}),
        )
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    // Usage now, so this month has an invoice for acme.
    let now = app.post_entries(entry("acme", "llm_tokens", "1", "now")).await;
    assert_eq!(now.status, 200, "{:?}", now.body);
    app.rollup().await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let as_of = chrono::Utc::now().to_rfc3339();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let dir = tempfile::tempdir().unwrap();
    // Overrides are on a day's bill from when they were set: this month's.
    let this_month = chrono::Utc::now().format("%Y-%m").to_string();
    let write = |name: &str, kind: &str, as_of: Option<&str>| {
        let path = dir.path().join(name);
        let mut args = vec!["export", kind, "-o", path.to_str().unwrap()];
        if kind == "invoice" {
            args.extend(["--period", "2026-09"]);
        } else if kind == "this-month-invoice" {
            args = vec![
                "export",
                "invoice",
                "-o",
                path.to_str().unwrap(),
                "--period",
                &this_month,
            ];
        } else {
            args.extend(["--from", "2026-09-01", "--to", "2026-10-01"]);
        }
        if let Some(t) = as_of {
            args.extend(["--as-of", t]);
        }
        let output = app.cli(&args);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        std::fs::read(path).unwrap()
    };
    let first_daily = write("d1.csv", "daily", Some(&as_of));
    let first_entries = write("e1.csv", "entries", Some(&as_of));
    let first_invoice = write("i1.csv", "invoice", Some(&as_of));
    let first_this_month = write("m1.csv", "this-month-invoice", Some(&as_of));
    // Later: a late entry for the same days, and a reversal.
    app.insert(&[("acme", "api_requests", "100", "late", "2026-09-03T12:00:00Z")])
        .await;
    app.post(
        &format!("/v1/entries/{}/reversal", ids[0]),
        json!({"idempotency_key": "undo"}),
    )
    .await;
    // And a plan assigned afterwards, effective from before the month; the
    // override removed, another one set.
    app.put_admin(
        "/v1/accounts/acme/plan",
        json!({"plan": "scale", "effective_at": "2026-08-01T00:00:00Z"}),
    )
    .await;
    let removed = app.delete_admin("/v1/accounts/acme/overrides/llm_tokens").await;
    assert_eq!(removed.status, 200, "{:?}", removed.body);
    app.put_admin("/v1/accounts/acme/overrides/agent_minutes", json!({"limit": "1"}))
        .await;
    app.rollup().await;
    assert_eq!(write("d2.csv", "daily", Some(&as_of)), first_daily, "identical bytes");
    assert_eq!(write("e2.csv", "entries", Some(&as_of)), first_entries);
    assert_eq!(write("i2.csv", "invoice", Some(&as_of)), first_invoice);
    assert_eq!(write("m2.csv", "this-month-invoice", Some(&as_of)), first_this_month);
    // A moment still to come would not give the same file twice: refused,
    // and no file made.
    let tomorrow = (chrono::Utc::now() + chrono::Duration::days(1))
        .format("%Y-%m-%d")
        .to_string();
    let future = dir.path().join("future.csv");
    let refused = app.cli(&[
        "export",
        "daily",
        "--from",
        "2026-09-01",
        "--to",
        "2026-10-01",
        "--as-of",
        &tomorrow,
        "-o",
        future.to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("later than now"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(!future.exists());
    let first = String::from_utf8(first_this_month).unwrap();
    assert!(first.contains("acme,free,llm_tokens,1,5000,"), "{first}");
    let this_month_now = String::from_utf8(write("m3.csv", "this-month-invoice", None)).unwrap();
    assert!(
        this_month_now.contains("acme,scale,agent_minutes,0,1,"),
        "{this_month_now}"
    );
    // Unlimited on every day of the month (scale, the override gone): no
    // line, as API.md asks a line per limited resource.
    assert!(!this_month_now.contains("acme,scale,llm_tokens,"), "{this_month_now}");
    let invoice_now = String::from_utf8(write("i3.csv", "invoice", None)).unwrap();
    assert!(invoice_now.contains("acme,scale,plan,30,30,,30,30"), "{invoice_now}");
    // The agent_minutes override was set after September: not on its bill,
    // where scale leaves agent_minutes and llm_tokens unlimited, so no line.
    assert!(!invoice_now.contains("acme,scale,agent_minutes,"), "{invoice_now}");
    assert!(!invoice_now.contains("acme,scale,llm_tokens,"), "{invoice_now}");
    assert!(invoice_now.contains("acme,scale,api_requests,"), "{invoice_now}");
    let now = String::from_utf8(write("d3.csv", "daily", None)).unwrap();
    assert!(now.contains("acme,api_requests,2026-09-03,100,3"), "{now}");
}

async fn an_invoice_prorates_a_mid_month_plan_change_and_bills_soft_overage(app: TestApp) {
    // September 2026 has 30 days: 15 on free, then pro from the 16th.
    let set = app
        .put_admin(
            "/v1/accounts/acme/plan",
            json!({"plan": "pro", "effective_at": "2026-09-16T00:00:00Z"}),
        )
        .await;
    assert_eq!(set.status, 200);
    app.insert(&[
        // On free: 2 000 llm_tokens on a 1 000/day hard limit (posted, so not refused): shown, not billed.
        ("acme", "llm_tokens", "2000", "t1", "2026-09-10T10:00:00Z"),
        // On pro: 60 000 on a 50 000/day soft limit at 0.00002: 10 000 over = 0.2.
        ("acme", "llm_tokens", "60000", "t2", "2026-09-20T10:00:00Z"),
        // And 50 001 the next day: 1 over = 0.00002.
        ("acme", "llm_tokens", "50001", "t3", "2026-09-21T10:00:00Z"),
        ("acme", "api_requests", "1234", "r1", "2026-09-21T10:00:00Z"),
    ])
    .await;
    // A scale account a whole month, 10 000 123 requests on a 10 000 000 soft monthly limit at 0.000001.
    app.put_admin(
        "/v1/accounts/big/plan",
        json!({"plan": "scale", "effective_at": "2026-01-01T00:00:00Z"}),
    )
    .await;
    app.insert(&[("big", "api_requests", "10000123", "b1", "2026-09-05T00:00:00Z")])
        .await;
    // From one paid plan to another on the 16th: 15 days of pro (5) and 15 of scale (15).
    for (plan, from) in [("pro", "2026-01-01T00:00:00Z"), ("scale", "2026-09-16T00:00:00Z")] {
        app.put_admin("/v1/accounts/mover/plan", json!({"plan": plan, "effective_at": from}))
            .await;
    }
    // Assigned only after the month: no invoice for it.
    app.put_admin(
        "/v1/accounts/later/plan",
        json!({"plan": "pro", "effective_at": "2026-10-01T00:00:00Z"}),
    )
    .await;
    app.rollup().await;
    let dir = tempfile::tempdir().unwrap();
    let rows = export(
        &app,
        dir.path(),
        "invoice.csv",
        &["export", "invoice", "--period", "2026-09"],
    );
    assert_eq!(rows[0], INVOICE_HEADER_OF_API_MD);
    let line = |account: &str, resource: &str| -> Vec<String> {
        rows.iter()
            .find(|r| r[0] == account && r[2] == resource)
            .unwrap_or_else(|| panic!("{account}/{resource}: {rows:?}"))
            .clone()
    };
    // One plan line per account: the last day's plan, its days and price;
    // the amount carries every plan's pro-rated share (free's is 0).
    assert_eq!(
        line("acme", "plan")[..],
        ["acme", "pro", "plan", "15", "30", "", "10", "5"]
    );
    assert_eq!(
        line("mover", "plan")[..],
        ["mover", "scale", "plan", "15", "30", "", "30", "20"]
    );
    for account in ["acme", "big", "mover"] {
        let plan_lines = rows.iter().filter(|r| r[0] == account && r[2] == "plan").count();
        assert_eq!(plan_lines, 1, "{account}: {rows:?}");
    }
    assert!(rows.iter().all(|r| r[0] != "later"), "{rows:?}");
    assert!(rows.iter().all(|r| r[2] != "total"), "no extra lines: {rows:?}");
    let acme_due: rust_decimal::Decimal = rows
        .iter()
        .filter(|r| r[0] == "acme")
        .map(|r| r[7].parse::<rust_decimal::Decimal>().unwrap())
        .sum();
    assert_eq!(
        acme_due.to_string(),
        "5.20002",
        "summing amount_due counts each line once"
    );
    assert_eq!(
        line("acme", "llm_tokens")[..],
        [
            "acme",
            "pro",
            "llm_tokens",
            "112001",
            "50000",
            "11001",
            "0.00002",
            "0.20002"
        ]
    );
    assert_eq!(
        line("acme", "api_requests")[..],
        ["acme", "pro", "api_requests", "1234", "1000000", "0", "0", "0"]
    );
    assert_eq!(line("acme", "ai_generations")[4], "unlimited");
    assert_eq!(
        line("big", "api_requests")[..],
        [
            "big",
            "scale",
            "api_requests",
            "10000123",
            "10000000",
            "123",
            "0.000001",
            "0.000123"
        ]
    );
    assert_eq!(
        line("big", "plan")[..],
        ["big", "scale", "plan", "30", "30", "", "30", "30"]
    );
    let one = export(
        &app,
        dir.path(),
        "one.csv",
        &["export", "invoice", "--period", "2026-09", "--account", "big"],
    );
    // Exactly big's lines of the whole invoice, header first.
    let big: Vec<_> = rows.iter().filter(|r| r[0] == "big").cloned().collect();
    assert!(!big.is_empty());
    assert_eq!(one[0], rows[0], "the header");
    assert_eq!(one[1..], big[..]);
}

/// Ledger rows whose running sum leaves 64 bits of minor units while their
/// net fits are read as that net everywhere, folded or not, on both engines;
/// and the stats add the platform's total, which may pass 64 bits while
/// every account's fits, in 128 bits. SQLite's SUM raised "integer overflow"
/// at the first (PostgreSQL adds a bigint SUM in numeric), which also failed
/// every --as-of export and so the monthly reports; the stats failed on both.
async fn sums_that_leave_64_bits_on_the_way_but_end_within_them_read_alike_and_stats_add_past_them(app: TestApp) {
    // 999 999 999 999 999.99 agent minutes is 99 999 999 999 999 999 minor
    // units (a hundredth): 93 of them pass 2^63, 91 do not.
    let big = "999999999999999.99";
    let at = "2026-09-20T12:00:00Z";
    let keys: Vec<String> = (0..98).map(|i| format!("k{i}")).collect();
    let mut rows: Vec<(&str, &str, &str, &str, &str)> = keys[..93]
        .iter()
        .map(|k| ("ovf", "agent_minutes", big, k.as_str(), at))
        .collect();
    let minus = format!("-{big}");
    rows.extend(
        keys[93..95]
            .iter()
            .map(|k| ("ovf", "agent_minutes", minus.as_str(), k.as_str(), at)),
    );
    rows.extend(
        keys[95..]
            .iter()
            .map(|k| ("other", "agent_minutes", big, k.as_str(), at)),
    );
    app.insert(&rows).await;
    let net = "90999999999999999.09";
    let dir = tempfile::tempdir().unwrap();
    for stage in ["unfolded", "folded"] {
        let check = app
            .post(
                "/v1/quota/check",
                json!({"account": "ovf", "resource": "agent_minutes", "at": at}),
            )
            .await;
        assert_eq!(
            (check.status, &check.body["used"]),
            (200, &json!(net)),
            "{stage}: {:?}",
            check.body
        );
        let series = app
            .get("/v1/accounts/ovf/timeseries?resource=agent_minutes&granularity=day&from=2026-09-20&to=2026-09-21")
            .await;
        assert_eq!(series.status, 200, "{stage}: {:?}", series.body);
        assert_eq!(
            series.body["points"],
            json!([{"start": "2026-09-20", "amount": net}]),
            "{stage}"
        );
        let daily = export(
            &app,
            dir.path(),
            &format!("daily-{stage}.csv"),
            &["export", "daily", "--from", "2026-09-20", "--to", "2026-09-21"],
        );
        // Rows in account order: "other" first.
        assert_eq!(daily[2], ["ovf", "agent_minutes", "2026-09-20", net, "95"], "{stage}");
        let stats = app.get("/v1/admin/stats?period=2026-09").await;
        assert_eq!(stats.status, 200, "{stage}: {:?}", stats.body);
        assert_eq!(
            stats.body["totals"],
            json!([{"resource": "agent_minutes", "amount": "93999999999999999.06", "entries": 98, "accounts": 2}]),
            "{stage}"
        );
        app.rollup().await;
    }
    let as_of = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let monthly = export(
        &app,
        dir.path(),
        "monthly.csv",
        &[
            "export", "monthly", "--from", "2026-09", "--to", "2026-10", "--as-of", &as_of,
        ],
    );
    assert_eq!(monthly[2], ["ovf", "agent_minutes", "2026-09", net, "95"]);
}

/// Review AN. An unfolded tail past 64 bits of minor units whose folded
/// total brings it back is exported as the sum (PostgreSQL read the tail as
/// bigint and failed with a bare "bigint out of range"); a total past them,
/// unfolded, fails the export naming it, on both engines; folded, it is
/// named once (the name used to come before the overflow's own words).
async fn an_unfolded_tail_past_64_bits_is_added_exactly_and_a_total_past_them_is_named_once(app: TestApp) {
    let big = "999999999999999.99";
    let minus = format!("-{big}");
    let keys: Vec<String> = (0..340).map(|i| format!("k{i}")).collect();
    /// One agent_minutes row of `account` per key, all at one instant.
    fn rows<'a>(
        account: &'a str,
        amount: &'a str,
        keys: &'a [String],
    ) -> Vec<(&'a str, &'a str, &'a str, &'a str, &'a str)> {
        keys.iter()
            .map(|k| (account, "agent_minutes", amount, k.as_str(), "2026-09-20T12:00:00Z"))
            .collect()
    }
    let minus = minus.as_str();
    // Folded: 50 taken off; then 93 added, unfolded: past 2^63 alone.
    app.insert(&rows("ovf", minus, &keys[..50])).await;
    app.rollup().await;
    app.insert(&rows("ovf", big, &keys[50..143])).await;
    let dir = tempfile::tempdir().unwrap();
    let args = ["export", "monthly", "--from", "2026-09", "--to", "2026-10"];
    let monthly = export(&app, dir.path(), "monthly.csv", &args);
    assert_eq!(
        monthly[1],
        ["ovf", "agent_minutes", "2026-09", "42999999999999999.57", "143"]
    );
    // Review AQ: the time series adds the same way (PostgreSQL read each
    // part as bigint), and names a total past 64 bits as SQLite does.
    let series = |account: &str| {
        app.cli(&[
            "timeseries",
            account,
            "agent_minutes",
            "--granularity",
            "month",
            "--from",
            "2026-09",
            "--to",
            "2026-10",
        ])
    };
    let ovf = series("ovf");
    assert!(
        String::from_utf8_lossy(&ovf.stdout).contains("42999999999999999.57"),
        "{ovf:?}"
    );

    // 94 past 2^63, unfolded: the export names the total.
    app.insert(&rows("whale", big, &keys[143..237])).await;
    let failed = app.cli(&args);
    assert_eq!(failed.status.code(), Some(1));
    let said = String::from_utf8_lossy(&failed.stderr);
    assert!(
        said.contains("the total of account 'whale', resource 'agent_minutes', 2026-09-01") && !said.contains("bigint"),
        "{said}"
    );
    for whale in [
        series("whale"),
        app.cli(&[
            "timeseries",
            "whale",
            "agent_minutes",
            "--from",
            "2026-09-20",
            "--to",
            "2026-09-21",
        ]),
    ] {
        let said = String::from_utf8_lossy(&whale.stderr);
        assert!(!whale.status.success(), "{whale:?}");
        assert!(
            said.contains("(the total of account 'whale', resource 'agent_minutes', 2026-09-")
                && !said.contains("bigint"),
            "{said}"
        );
    }
    // So does one as of now, and the invoice (each sums the ledger itself).
    let as_of = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    for command in [
        &[&args[..], &["--as-of", &as_of]].concat(),
        &["export", "invoice", "--period", "2026-09"][..],
    ] {
        let failed = app.cli(command);
        assert_eq!(failed.status.code(), Some(1), "{command:?}");
        let said = String::from_utf8_lossy(&failed.stderr);
        assert!(
            said.contains("account 'whale', resource 'agent_minutes'") && !said.contains("bigint"),
            "{command:?}: {said}"
        );
    }
    // Folded: named as the stored total, the advice said once; a monthly
    // export names no daily total (it reads none).
    app.rollup().await;
    let failed = app.cli(&args);
    assert_eq!(failed.status.code(), Some(1));
    let said = String::from_utf8_lossy(&failed.stderr);
    assert!(
        said.contains(
            "a sum passed the 64-bit range of minor units (bigint out of range); a stored total is past it among \
             those this command reads: the monthly total of whale / agent_minutes / 2026-09; docs/operations.md"
        ) || said.contains(
            "a sum passed the 64-bit range of minor units (the total of account 'whale', resource 'agent_minutes', \
             2026-09-01); a stored total is past it among those this command reads: the monthly total of whale / \
             agent_minutes / 2026-09; docs/operations.md"
        ),
        "{said}"
    );
    assert_eq!(said.matches("docs/operations.md").count(), 1, "{said}");
    let folded = String::from_utf8_lossy(&series("whale").stderr).into_owned();
    assert!(
        folded.contains("(the total of account 'whale', resource 'agent_minutes', 2026-09-01)")
            && !folded.contains("bigint"),
        "{folded}"
    );
    // Review AO: an unfolded total past 64 bits beside a stored one keeps
    // its name (it fails the export first: "orca" sorts before "whale").
    // PostgreSQL reads the stored totals as bigint, so the stored one may
    // stop the read before the merge reaches orca's tail: then orca is named
    // once whale's total is corrected.
    app.insert(&rows("orca", big, &keys[237..331])).await;
    let failed = app.cli(&args);
    assert_eq!(failed.status.code(), Some(1));
    let said = String::from_utf8_lossy(&failed.stderr);
    let orca = "(the total of account 'orca', resource 'agent_minutes', 2026-09-01)";
    assert!(
        (said.contains(orca) || (app.backend == Backend::Postgres && said.contains("(bigint out of range)")))
            && said.contains(
                "; a stored total is past it among those this command reads: the monthly total of whale / \
                 agent_minutes / 2026-09; docs/operations.md"
            ),
        "{said}"
    );
}

async fn admin_stats_and_top_accounts_describe_a_known_dataset(app: TestApp) {
    seed(&app).await;
    app.put_admin(
        "/v1/accounts/globex/plan",
        json!({"plan": "pro", "effective_at": "2026-01-01T00:00:00Z"}),
    )
    .await;
    app.rollup().await;
    let stats = app.get("/v1/admin/stats?period=2026-09").await;
    assert_eq!(stats.status, 200, "{:?}", stats.body);
    assert_eq!(
        stats.body,
        json!({
            "period": "2026-09",
            "totals": [
                {"resource": "agent_minutes", "amount": "1.25", "entries": 1, "accounts": 1},
                {"resource": "api_requests", "amount": "357", "entries": 3, "accounts": 2},
            ],
            "active_accounts": 2,
            "accounts_per_plan": {"free": 1, "pro": 1},
            "estimated_revenue": "10.00",
        })
    );
    let top = app
        .get("/v1/admin/top?resource=api_requests&period=2026-09&limit=1")
        .await;
    assert_eq!(top.body["accounts"], json!([{"account": "acme", "amount": "350"}]));
    let reader = app.key(tally::domain::Role::Service, None).await;
    assert_eq!(
        app.request("GET", "/v1/admin/stats?period=2026-09", Some(&reader), None)
            .await
            .status,
        403
    );
    assert_eq!(app.get("/v1/admin/stats?period=September").await.status, 422);
    let cli: serde_json::Value = serde_json::from_slice(&app.cli(&["stats", "--period", "2026-09"]).stdout).unwrap();
    assert_eq!(cli, stats.body);
    // An account whose plan starts after a month is not on that month's
    // stats; on a later month's it is counted under the plan the invoice
    // bills it at, even a month still to come.
    app.put_admin(
        "/v1/accounts/later/plan",
        json!({"plan": "scale", "effective_at": "2099-01-01T00:00:00Z"}),
    )
    .await;
    assert_eq!(app.get("/v1/admin/stats?period=2026-09").await.body, stats.body);
    let future = app.get("/v1/admin/stats?period=2099-01").await;
    assert_eq!(future.body["accounts_per_plan"], json!({"pro": 1, "scale": 1}));
    assert_eq!(future.body["estimated_revenue"], "40.00");
    let cli_top: serde_json::Value = serde_json::from_slice(
        &app.cli(&["top", "--resource", "api_requests", "--period", "2026-09"])
            .stdout,
    )
    .unwrap();
    assert_eq!(
        cli_top["accounts"],
        json!([{"account": "acme", "amount": "350"}, {"account": "globex", "amount": "7"}])
    );
    // Without --period the CLI takes this month, as the HTTP reads do (review R).
    let this_month = chrono::Utc::now().format("%Y-%m").to_string();
    let stats_now: serde_json::Value = serde_json::from_slice(&app.cli(&["stats"]).stdout).unwrap();
    assert_eq!(stats_now["period"], this_month.as_str());
    assert_eq!(stats_now, app.get("/v1/admin/stats").await.body);
    let top_now: serde_json::Value =
        serde_json::from_slice(&app.cli(&["top", "--resource", "api_requests"]).stdout).unwrap();
    assert_eq!(top_now["period"], this_month.as_str());
    // A limit out of range is a usage error (exit 2), as the other flags' are.
    let none = app.cli(&["top", "--resource", "api_requests", "--limit", "0"]);
    assert_eq!(none.status.code(), Some(2), "{none:?}");
    assert!(
        String::from_utf8_lossy(&none.stderr).contains("0 is not in 1..=1000"),
        "{none:?}"
    );
}

async fn the_monthly_reports_job_writes_each_report_once(app: TestApp) {
    seed(&app).await;
    // Entries in last month too, for the scheduled run below to report (their
    // own accounts: the seed's months could be last month on some clock).
    let last_month = tally::jobs::reports::previous_month(chrono::Utc::now());
    let in_last_month = format!("{}T12:00:00Z", last_month + chrono::Days::new(14));
    app.insert(&[
        ("north", "api_requests", "1234", "lm1", &in_last_month),
        ("north", "api_requests", "66", "lm2", &in_last_month),
        ("south", "llm_tokens", "7", "lm3", &in_last_month),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let month = chrono::NaiveDate::from_ymd_opt(2026, 9, 1).unwrap();
    let write = |overwrite| {
        tally::jobs::reports::write_monthly_reports(app.store.as_ref(), &app.catalog, dir.path(), month, overwrite)
    };
    let before = chrono::Utc::now();
    let first = write(false).await.unwrap();
    assert_eq!(
        first.written,
        [
            dir.path().join("monthly-2026-09.csv"),
            dir.path().join("invoice-2026-09.csv")
        ]
    );
    let taken_at = first.taken_at.expect("written files say when they were taken");
    assert!(before <= taken_at && taken_at <= chrono::Utc::now());
    let monthly = read_csv(&dir.path().join("monthly-2026-09.csv"));
    assert_eq!(monthly[1], ["acme", "agent_minutes", "2026-09", "1.25", "1"]);
    // `--as-of` the instant the job reports gives the same file.
    let as_of = taken_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let again = app.cli(&[
        "export",
        "monthly",
        "--from",
        "2026-09-01",
        "--to",
        "2026-10-01",
        "--as-of",
        &as_of,
    ]);
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(
        String::from_utf8(again.stdout).unwrap(),
        std::fs::read_to_string(dir.path().join("monthly-2026-09.csv")).unwrap()
    );
    // The invoice too: both files are as of the same instant.
    let invoice = app.cli(&["export", "invoice", "--period", "2026-09", "--as-of", &as_of]);
    assert!(invoice.status.success(), "{}", String::from_utf8_lossy(&invoice.stderr));
    assert_eq!(
        String::from_utf8(invoice.stdout).unwrap(),
        std::fs::read_to_string(dir.path().join("invoice-2026-09.csv")).unwrap()
    );
    // A second run keeps what exists, even if the ledger moved on.
    std::fs::write(dir.path().join("monthly-2026-09.csv"), "edited by finance\n").unwrap();
    let second = write(false).await.unwrap();
    assert!(second.written.is_empty());
    assert_eq!(second.taken_at, None, "nothing was taken");
    assert_eq!(second.kept.len(), 2);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("monthly-2026-09.csv")).unwrap(),
        "edited by finance\n"
    );
    let forced = write(true).await.unwrap();
    assert_eq!(forced.written.len(), 2);
    assert!(
        std::fs::read_to_string(dir.path().join("monthly-2026-09.csv"))
            .unwrap()
            .starts_with("account,resource,month")
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 2, "no temp files left: {leftovers:?}");
    // Review BM: an empty file is no report (each has its header), and was
    // kept for good; it is written over, the other file kept.
    std::fs::write(dir.path().join("invoice-2026-09.csv"), "").unwrap();
    let over_empty = write(false).await.unwrap();
    assert_eq!(over_empty.written, [dir.path().join("invoice-2026-09.csv")]);
    assert_eq!(over_empty.kept, [dir.path().join("monthly-2026-09.csv")]);
    assert_eq!(
        read_csv(&dir.path().join("invoice-2026-09.csv"))[0],
        INVOICE_HEADER_OF_API_MD
    );
    std::fs::write(dir.path().join("monthly-2026-09.csv"), "").unwrap();
    let over_empty = write(false).await.unwrap();
    assert_eq!(over_empty.written, [dir.path().join("monthly-2026-09.csv")]);
    assert_eq!(read_csv(&dir.path().join("monthly-2026-09.csv"))[0][0], "account");
    // A reports directory that is a file is said to be one.
    let not_a_folder = dir.path().join("reports-file");
    std::fs::write(&not_a_folder, "").unwrap();
    let refused = app.cli(&[
        "jobs",
        "run",
        "monthly-reports",
        "--reports-dir",
        not_a_folder.to_str().unwrap(),
    ]);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("is a file, not a folder"), "{said}");
    std::fs::remove_file(&not_a_folder).unwrap();
    // The scheduled job writes last month's reports into --reports-dir.
    let job_dir = tempfile::tempdir().unwrap();
    let run = app.cli(&[
        "jobs",
        "run",
        "monthly-reports",
        "--reports-dir",
        job_dir.path().to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    if tally::jobs::reports::previous_month(chrono::Utc::now()) != last_month {
        // The month turned while the test ran: the job reported another month.
        return;
    }
    let last = last_month.format("%Y-%m").to_string();
    let monthly = read_csv(&job_dir.path().join(format!("monthly-{last}.csv")));
    assert_eq!(monthly[0], ["account", "resource", "month", "amount", "entries"]);
    let ours: Vec<_> = monthly[1..]
        .iter()
        .filter(|r| r[0] == "north" || r[0] == "south")
        .map(|r| r.join(","))
        .collect();
    assert_eq!(
        ours,
        [
            format!("north,api_requests,{last},1300,2"),
            format!("south,llm_tokens,{last},7,1"),
        ]
    );
    let invoice = read_csv(&job_dir.path().join(format!("invoice-{last}.csv")));
    assert_eq!(invoice[0], INVOICE_HEADER_OF_API_MD);
    let used = |account: &str, resource: &str| {
        invoice
            .iter()
            .find(|r| r[0] == account && r[2] == resource)
            .unwrap_or_else(|| panic!("{account}/{resource}: {invoice:?}"))[3]
            .clone()
    };
    assert_eq!(used("north", "api_requests"), "1300");
    assert_eq!(used("south", "llm_tokens"), "7");
    // A plan line's `used` is the days on the plan: all of last month.
    let days = ((last_month + chrono::Months::new(1)) - last_month).num_days();
    assert_eq!(used("north", "plan"), days.to_string());
    assert_eq!(used("south", "plan"), days.to_string());

    // A missed 1st costs nothing: the next run writes every month after the
    // newest one the directory holds.
    let behind = tempfile::tempdir().unwrap();
    let tag = |months_before: u32| {
        (last_month - chrono::Months::new(months_before))
            .format("%Y-%m")
            .to_string()
    };
    for name in [format!("monthly-{}.csv", tag(3)), format!("invoice-{}.csv", tag(3))] {
        std::fs::write(behind.path().join(name), "written on time\n").unwrap();
    }
    let caught_up = app.cli(&[
        "jobs",
        "run",
        "monthly-reports",
        "--reports-dir",
        behind.path().to_str().unwrap(),
    ]);
    assert!(
        caught_up.status.success(),
        "{}",
        String::from_utf8_lossy(&caught_up.stderr)
    );
    for months_before in 0..=2 {
        for kind in ["monthly", "invoice"] {
            let path = behind.path().join(format!("{kind}-{}.csv", tag(months_before)));
            assert!(path.exists(), "{} was not caught up", path.display());
        }
    }
    let kept = std::fs::read_to_string(behind.path().join(format!("monthly-{}.csv", tag(3)))).unwrap();
    assert_eq!(kept, "written on time\n");
}

async fn bad_export_requests_fail_clearly_and_leave_no_file(app: TestApp) {
    seed(&app).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.csv");
    let out_str = out.to_str().unwrap();
    let reversed = app.cli(&[
        "export",
        "daily",
        "--from",
        "2026-10-01",
        "--to",
        "2026-09-01",
        "-o",
        out_str,
    ]);
    assert!(!reversed.status.success());
    assert!(String::from_utf8_lossy(&reversed.stderr).contains("--from (2026-10-01) must be before --to (2026-09-01)"));
    let garbage = app.cli(&[
        "export",
        "entries",
        "--from",
        "last week",
        "--to",
        "2026-09-01",
        "-o",
        out_str,
    ]);
    assert!(!garbage.status.success());
    assert!(String::from_utf8_lossy(&garbage.stderr).contains("is not a date like 2026-11-01"));
    // A two-digit year once read as the year 26, and exported every month
    // from 0026 on; a one-digit month was taken too.
    for (from, to) in [("26-11", "2026-12"), ("2026-9", "2026-10")] {
        let typo = app.cli(&["export", "monthly", "--from", from, "--to", to, "-o", out_str]);
        assert_eq!(typo.status.code(), Some(2), "{from}");
        assert!(
            String::from_utf8_lossy(&typo.stderr).contains(&format!("\"{from}\" is not a date like 2026-11-01")),
            "{}",
            String::from_utf8_lossy(&typo.stderr)
        );
    }
    let invoice = app.cli(&["export", "invoice", "--period", "26-11", "-o", out_str]);
    assert!(String::from_utf8_lossy(&invoice.stderr).contains("\"26-11\" is not a month like 2026-11"));
    assert!(!out.exists(), "no file from a refused export");
    let misaligned = app.cli(&[
        "export",
        "monthly",
        "--from",
        "2026-09-15",
        "--to",
        "2026-10-01",
        "-o",
        out_str,
    ]);
    assert!(String::from_utf8_lossy(&misaligned.stderr).contains("first day of a month"));
    let unwritable = app.cli(&[
        "export",
        "entries",
        "--from",
        "2026-09-01",
        "--to",
        "2026-10-01",
        "-o",
        "/nonexistent/dir/x.csv",
    ]);
    assert!(!unwritable.status.success());
    let stderr = String::from_utf8_lossy(&unwritable.stderr);
    assert!(
        stderr.contains("the folder /nonexistent/dir does not exist") && !stderr.contains(".tally-export-"),
        "{stderr}"
    );
    assert!(!out.exists(), "no partial file");
    let nobody = app.cli(&[
        "export",
        "entries",
        "--from",
        "2026-09-01",
        "--to",
        "2026-10-01",
        "--account",
        "nobody",
        "-o",
        out_str,
    ]);
    assert!(nobody.status.success());
    assert!(String::from_utf8_lossy(&nobody.stderr).contains("no rows for account 'nobody'"));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "id,account,resource,amount,occurred_at,recorded_at,idempotency_key,source,reverses,metadata\n"
    );
    let exists = app.cli(&[
        "export",
        "entries",
        "--from",
        "2026-09-01",
        "--to",
        "2026-10-01",
        "-o",
        out_str,
    ]);
    assert!(!exists.status.success());
    assert!(String::from_utf8_lossy(&exists.stderr).contains("--overwrite"));
    // A folder: said up front, before the export runs.
    let folder = out.parent().unwrap().to_str().unwrap().to_owned();
    let refused = app.cli(&[
        "export",
        "entries",
        "--from",
        "2026-09-01",
        "--to",
        "2026-10-01",
        "--overwrite",
        "-o",
        &folder,
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("is a folder"), "{stderr}");
    // A folder that takes no new files (as root too): the folder, the
    // system's reason and what to do, not the bare "entity not found".
    let refused = app.cli(&[
        "export",
        "entries",
        "--from",
        "2026-09-01",
        "--to",
        "2026-10-01",
        "-o",
        "/proc/tally-export.csv",
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "cannot create a file in /proc (for /proc/tally-export.csv); give -o a path in a folder you can write to"
        ) && stderr.contains("no such file or directory")
            && !stderr.contains("entity not found"),
        "{stderr}"
    );
    // A file where the folder should be: not "create the folder first",
    // which cannot be done.
    let under_a_file = format!("{out_str}/x.csv");
    let refused = app.cli(&[
        "export",
        "entries",
        "--from",
        "2026-09-01",
        "--to",
        "2026-10-01",
        "-o",
        &under_a_file,
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("{out_str} is a file, not a folder (for {under_a_file})")),
        "{stderr}"
    );
    // Review AT: deeper under it too (its folder cannot be created).
    let deeper = format!("{out_str}/sub/x.csv");
    let refused = app.cli(&[
        "export",
        "entries",
        "--from",
        "2026-09-01",
        "--to",
        "2026-10-01",
        "-o",
        &deeper,
    ]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(&format!("{out_str} is a file, not a folder (for {deeper})")),
        "{stderr}"
    );
    let stdout = app.cli(&[
        "export",
        "monthly",
        "--from",
        "2026-09",
        "--to",
        "2026-10",
        "--resource",
        "agent_minutes",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&stdout.stdout),
        "account,resource,month,amount,entries\nacme,agent_minutes,2026-09,1.25,1\n"
    );
    assert!(
        stdout.stderr.is_empty() || !String::from_utf8_lossy(&stdout.stderr).contains("account,"),
        "nothing extra on stdout"
    );
}

/// Runs the `tally` binary with a plan catalog file.
fn cli_with_plans(app: &TestApp, plans: &Path, args: &[&str]) -> String {
    let output = app.cli_with_plans(plans, args);
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

async fn exports_write_fractional_and_negative_amounts_exactly_for_any_decimals(app: TestApp) {
    let dir = tempfile::tempdir().unwrap();
    let plans = dir.path().join("plans.toml");
    std::fs::write(
        &plans,
        format!(
            "{}\n[resources.gpu_seconds]\ndecimals = 9\n",
            tally::domain::catalog::BUILTIN_CATALOG_TOML
        ),
    )
    .unwrap();
    let day = (chrono::Utc::now() - chrono::Duration::days(2)).date_naive();
    let next = day.succ_opt().unwrap();
    let import = |name: &str, rows: &[(&str, &str, &str, &str)]| {
        let path = dir.path().join(name);
        let mut csv = String::from("account,resource,amount,occurred_at,idempotency_key\n");
        for (account, resource, amount, key) in rows {
            csv.push_str(&format!("{account},{resource},{amount},{day}T12:00:00.25Z,{key}\n"));
        }
        std::fs::write(&path, csv).unwrap();
        cli_with_plans(&app, &plans, &["import", path.to_str().unwrap()]);
    };
    import(
        "folded.csv",
        &[
            ("acme", "agent_minutes", "-0.05", "m1"),
            ("acme", "agent_minutes", "1.25", "m2"),
            ("acme", "gpu_seconds", "0.000000001", "g1"),
            ("acme", "gpu_seconds", "-1.5", "g2"),
            ("beta", "gpu_seconds", "123.456789012", "g3"),
        ],
    );
    cli_with_plans(&app, &plans, &["rollup"]);
    // The unfolded tail: one key already folded (merged into its total), one new.
    import(
        "tail.csv",
        &[
            ("acme", "agent_minutes", "-1.25", "m3"),
            ("acme", "gpu_seconds", "-0.000000002", "g4"),
            ("alfa", "gpu_seconds", "7", "g5"),
        ],
    );
    let range = ["--from", &day.to_string(), "--to", &next.to_string(), "-o"];
    let entries = dir.path().join("entries.csv");
    let mut args = vec!["export", "entries"];
    args.extend(range);
    args.push(entries.to_str().unwrap());
    cli_with_plans(&app, &plans, &args);
    // By key: PostgreSQL numbers a batch in (account, key) order, SQLite in file order.
    let mut amounts: Vec<_> = read_csv(&entries)[1..]
        .iter()
        .map(|r| (r[6].clone(), r[3].clone(), r[4].clone()))
        .collect();
    amounts.sort();
    let at = format!("{day}T12:00:00.250Z");
    let expected = [
        ("m1", "-0.05"),
        ("m2", "1.25"),
        ("g1", "0.000000001"),
        ("g2", "-1.5"),
        ("g3", "123.456789012"),
        ("m3", "-1.25"),
        ("g4", "-0.000000002"),
        ("g5", "7"),
    ]
    .map(|(key, amount)| (key.to_owned(), amount.to_owned(), at.clone()));
    let mut expected = expected.to_vec();
    expected.sort();
    assert_eq!(amounts, expected);
    let daily = dir.path().join("daily.csv");
    let mut args = vec!["export", "daily"];
    args.extend(range);
    args.push(daily.to_str().unwrap());
    cli_with_plans(&app, &plans, &args);
    let text = std::fs::read_to_string(&daily).unwrap();
    assert_eq!(
        text,
        format!(
            "account,resource,day,amount,entries\n\
             acme,agent_minutes,{day},-0.05,3\n\
             acme,gpu_seconds,{day},-1.500000001,3\n\
             alfa,gpu_seconds,{day},7,1\n\
             beta,gpu_seconds,{day},123.456789012,1\n"
        )
    );
}

/// The process's umask, from `/proc/self/status` (Linux).
fn umask() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .expect("a Umask line");
    u32::from_str_radix(line.trim(), 8).expect("an octal umask")
}

/// Finance reads the files a service user writes: an export is created as
/// any new file is (0666 less the umask; tempfile's own 0600 used to stay).
/// And `tally export … | head` is not an error when `head` stops reading.
async fn an_export_file_gets_the_umask_permissions_and_a_closed_pipe_is_not_an_error(app: TestApp) {
    use std::os::unix::fs::PermissionsExt;
    seed(&app).await;
    let dir = tempfile::tempdir().unwrap();
    export(
        &app,
        dir.path(),
        "daily.csv",
        &["export", "daily", "--from", "2026-09-01", "--to", "2026-10-01"],
    );
    let mode = std::fs::metadata(dir.path().join("daily.csv"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o666 & !umask(), "mode {mode:o}");

    // The reading end is closed as soon as the process exists; the export
    // first connects to the database, so its writes find the pipe closed.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["export", "entries", "--from", "2026-09-01", "--to", "2026-10-01"])
        .env("TALLY_DATABASE_URL", &app.database_url)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("tally runs");
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("tally exits");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    assert!(!stderr.contains("error"), "{stderr}");
}

/// indicatif draws nothing on a pipe or a log; `--progress` still counts
/// there, as lines, and without it nothing is added to stderr.
async fn progress_is_written_as_lines_when_stderr_is_not_a_terminal(app: TestApp) {
    app.insert(&[
        ("acme", "api_requests", "1", "a", "2026-09-02T10:00:00Z"),
        ("acme", "api_requests", "2", "b", "2026-09-03T10:00:00Z"),
    ])
    .await;
    let args = ["export", "entries", "--from", "2026-09-01", "--to", "2026-10-01"];
    let with = app.cli(&[&args[..], &["--progress"]].concat());
    assert!(with.status.success());
    let stderr = String::from_utf8_lossy(&with.stderr);
    assert!(stderr.contains("2 rows after"), "{stderr}");
    let without = app.cli(&args);
    assert!(without.status.success());
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert!(!stderr.contains("rows after"), "{stderr}");
}

/// The temp files (`.tally-export-…`) in `dir`.
fn temp_files(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".tally-export-"))
        })
        .collect()
}

/// Ctrl-C or SIGTERM during `export -o FILE` stops it with exit 130: no FILE,
/// and no temp file left beside it (a killed process used to leave one per
/// attempt, tens of MB each).
async fn an_export_stopped_by_ctrl_c_or_sigterm_leaves_no_file_behind(app: TestApp) {
    // Enough rows that the export is still running when the signal lands.
    let at = chrono::DateTime::parse_from_rfc3339("2026-09-02T12:00:00Z")
        .unwrap()
        .timestamp_micros();
    let bulk = match app.backend {
        Backend::Sqlite => format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 300000) \
             INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key) \
             SELECT 'bulk', 'api_requests', 1, {at}, {at}, 'k' || i FROM n"
        ),
        Backend::Postgres => {
            "INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key) \
             SELECT 'bulk', 'api_requests', 1, '2026-09-02T12:00:00Z', now(), 'k' || i \
             FROM generate_series(1, 300000) AS i"
                .to_owned()
        }
    };
    app.execute_raw(&bulk).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    for signal in ["INT", "TERM"] {
        let dest = dir.path().join(format!("{signal}.csv"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["export", "entries", "--from", "2026-09-01", "--to", "2026-10-01", "-o"])
            .arg(&dest)
            .env("TALLY_DATABASE_URL", &app.database_url)
            .env("RUST_LOG", "warn")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("tally runs");
        // The temp file is there: the export has begun (and listens).
        let started = std::time::Instant::now();
        while temp_files(dir.path()).is_empty() {
            assert!(started.elapsed().as_secs() < 60, "the export never began");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let killed = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(killed.success());
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(130), "SIG{signal}: {stderr}");
        assert!(stderr.contains("interrupted"), "{stderr}");
        assert!(!dest.exists(), "SIG{signal}: {} was written", dest.display());
        assert_eq!(temp_files(dir.path()), Vec::<std::path::PathBuf>::new(), "SIG{signal}");
    }
}

/// `-o -` is standard output, as for most tools (it once wrote a file named
/// `-`); `-o LINK --overwrite` replaces the file the link points to, not the
/// link; and a device is refused, since the rename into place would replace
/// the device node (`-o /dev/stdout --overwrite` as root).
async fn the_output_dash_is_stdout_a_symlink_is_followed_and_a_device_is_refused(app: TestApp) {
    use std::os::unix::fs::FileTypeExt;
    seed(&app).await;
    let dir = tempfile::tempdir().unwrap();
    let daily = ["export", "daily", "--from", "2026-09-01", "--to", "2026-10-01"];
    let to_stdout = app.cli_in(dir.path(), &[&daily[..], &["-o", "-"]].concat());
    assert!(
        to_stdout.status.success(),
        "{}",
        String::from_utf8_lossy(&to_stdout.stderr)
    );
    let csv = String::from_utf8(to_stdout.stdout).unwrap();
    assert!(csv.starts_with("account,resource,day,amount,entries\n"), "{csv}");
    assert!(!dir.path().join("-").exists(), "no file named -");
    assert!(
        String::from_utf8_lossy(&to_stdout.stderr).contains(" rows to standard output"),
        "{}",
        String::from_utf8_lossy(&to_stdout.stderr)
    );
    // Review Y: with stdout redirected to a file, /dev/stdout is that file,
    // and was refused as one that exists.
    let redirected = dir.path().join("redirected.csv");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([&daily[..], &["-o", "/dev/stdout"]].concat())
        .env("TALLY_DATABASE_URL", &app.database_url)
        .env_remove("TALLY_PLANS")
        .stdout(std::fs::File::create(&redirected).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(std::fs::read_to_string(&redirected).unwrap(), csv);

    let target = dir.path().join("target.csv");
    std::fs::write(&target, "old\n").unwrap();
    let link = dir.path().join("link.csv");
    std::os::unix::fs::symlink("target.csv", &link).unwrap();
    let link_str = link.to_str().unwrap();
    let through_link = app.cli(&[&daily[..], &["-o", link_str, "--overwrite"]].concat());
    assert!(
        through_link.status.success(),
        "{}",
        String::from_utf8_lossy(&through_link.stderr)
    );
    assert!(
        std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(),
        "still a link"
    );
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        csv,
        "the target holds the export"
    );

    // A named pipe stands for the device: the test must not risk /dev itself.
    let pipe = dir.path().join("pipe");
    let made = std::process::Command::new("mkfifo").arg(&pipe).status().unwrap();
    assert!(made.success());
    let device = app.cli(&[&daily[..], &["-o", pipe.to_str().unwrap(), "--overwrite"]].concat());
    assert!(!device.status.success());
    let stderr = String::from_utf8_lossy(&device.stderr);
    assert!(stderr.contains("pipe is not a regular file"), "{stderr}");
    assert!(
        std::fs::metadata(&pipe).unwrap().file_type().is_fifo(),
        "the pipe is untouched"
    );
}

/// The unfolded tail of a daily or monthly export is bounded as the folded
/// totals are, [from, to): an entry not yet rolled up at `from`'s first
/// instant is in the file, one at `to`'s first instant is not (no row for a
/// bucket past the range).
async fn a_totals_export_takes_unfolded_entries_from_its_first_instant_and_stops_before_to(app: TestApp) {
    app.insert(&[
        ("acme", "api_requests", "3", "first", "2026-09-01T00:00:00Z"),
        ("acme", "api_requests", "5", "past", "2026-10-01T00:00:00Z"),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let daily = export(
        &app,
        dir.path(),
        "daily.csv",
        &["export", "daily", "--from", "2026-09-01", "--to", "2026-10-01"],
    );
    assert_eq!(
        daily[1..].to_vec(),
        [["acme", "api_requests", "2026-09-01", "3", "1"]
            .map(str::to_owned)
            .to_vec()]
    );
    let monthly = export(
        &app,
        dir.path(),
        "monthly.csv",
        &["export", "monthly", "--from", "2026-09", "--to", "2026-10"],
    );
    assert_eq!(
        monthly[1..].to_vec(),
        [["acme", "api_requests", "2026-09", "3", "1"]
            .map(str::to_owned)
            .to_vec()]
    );
}

/// `--as-of T` is the ledger as it stood at T, T included, as the entries
/// export takes it: an entry recorded at exactly T (its `recorded_at`, as the
/// listing shows it) is counted in the daily and monthly files.
async fn an_as_of_export_counts_an_entry_recorded_at_that_very_instant(app: TestApp) {
    app.insert(&[("acme", "api_requests", "6", "a", "2026-09-03T00:00:00Z")])
        .await;
    let listed = app.get("/v1/accounts/acme/entries").await;
    assert_eq!(listed.status, 200, "{:?}", listed.body);
    let recorded_at = listed.body["entries"][0]["recorded_at"].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let entries = export(
        &app,
        dir.path(),
        "entries.csv",
        &[
            "export",
            "entries",
            "--from",
            "2026-09-01",
            "--to",
            "2026-10-01",
            "--as-of",
            &recorded_at,
        ],
    );
    assert_eq!(entries.len(), 2, "the entries file holds it: {entries:?}");
    for (kind, from, to, bucket) in [
        ("daily", "2026-09-01", "2026-10-01", "2026-09-03"),
        ("monthly", "2026-09", "2026-10", "2026-09"),
    ] {
        let rows = export(
            &app,
            dir.path(),
            &format!("{kind}.csv"),
            &["export", kind, "--from", from, "--to", to, "--as-of", &recorded_at],
        );
        assert_eq!(
            rows[1..].to_vec(),
            [["acme", "api_requests", bucket, "6", "1"].map(str::to_owned).to_vec()],
            "{kind} as of {recorded_at}"
        );
    }
}

/// A top list breaks ties by account id, ascending, and a limit keeps the
/// first of the tied accounts.
async fn top_accounts_with_equal_usage_come_in_account_order(app: TestApp) {
    app.insert(&[
        ("bravo", "api_requests", "5", "b", "2026-09-02T00:00:00Z"),
        ("alpha", "api_requests", "5", "a", "2026-09-03T00:00:00Z"),
        ("charlie", "api_requests", "9", "c", "2026-09-04T00:00:00Z"),
    ])
    .await;
    let all = app.get("/v1/admin/top?resource=api_requests&period=2026-09").await;
    assert_eq!(all.status, 200, "{:?}", all.body);
    assert_eq!(
        all.body["accounts"],
        json!([
            {"account": "charlie", "amount": "9"},
            {"account": "alpha", "amount": "5"},
            {"account": "bravo", "amount": "5"},
        ])
    );
    let two = app
        .get("/v1/admin/top?resource=api_requests&period=2026-09&limit=2")
        .await;
    assert_eq!(
        two.body["accounts"],
        json!([{"account": "charlie", "amount": "9"}, {"account": "alpha", "amount": "5"}])
    );
}

/// Review BM: `export … -o tally.db --overwrite` (one word off `tally.csv`
/// in a cron line) renamed the CSV over the live database and exited 0. The
/// database file, its write-ahead log and any link to them are refused,
/// before anything is read, and the ledger is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_an_export_refuses_the_database_file_as_its_output() {
    let Some(app) = TestApp::spawn(Backend::Sqlite).await else {
        return;
    };
    seed(&app).await;
    let database = std::path::PathBuf::from(app.database_url.strip_prefix("sqlite://").unwrap());
    let folder = database.parent().unwrap();
    let symlink = folder.join("report.csv");
    std::os::unix::fs::symlink(&database, &symlink).unwrap();
    let hard_link = folder.join("hard-link.csv");
    std::fs::hard_link(&database, &hard_link).unwrap();
    let wal = folder.join("tally.db-wal");
    assert!(wal.exists(), "the running app keeps a write-ahead log");
    let shm = folder.join("tally.db-shm");
    // Not there now; SQLite would take a file by that name as its own.
    let journal = folder.join("tally.db-journal");
    assert!(!journal.exists());
    let other_spelling = folder.join(".").join("tally.db");

    let daily = ["export", "daily", "--from", "2026-09-01", "--to", "2026-10-01"];
    // Review BN: with the URL naming a link to the database, SQLite keeps
    // the WAL beside the target, which the guard did not look at.
    let link_url = format!("sqlite://{}", symlink.display());
    let through_the_link = ["--database-url", &link_url];
    for (output, url) in [
        (&database, &[][..]),
        (&symlink, &[]),
        (&hard_link, &[]),
        (&wal, &[]),
        (&shm, &[]),
        (&journal, &[]),
        (&other_spelling, &[]),
        (&wal, &through_the_link),
        (&database, &through_the_link),
    ] {
        let refused = app.cli(&[url, &daily[..], &["-o", output.to_str().unwrap(), "--overwrite"]].concat());
        assert_eq!(refused.status.code(), Some(1), "{}", output.display());
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            stderr.contains("is the database file") && stderr.contains("the export would replace the ledger"),
            "{}: {stderr}",
            output.display()
        );
    }
    let header = std::fs::read(&database).unwrap();
    assert!(header.starts_with(b"SQLite format 3\0"), "the database is still one");
    let usage = app.cli(&["usage", "acme", "--at", "2026-09-15T00:00:00Z"]);
    assert!(usage.status.success(), "{}", String::from_utf8_lossy(&usage.stderr));

    // A file of its own beside the database is written as before.
    let fine = app.cli(&[&daily[..], &["-o", folder.join("daily.csv").to_str().unwrap()]].concat());
    assert!(fine.status.success(), "{}", String::from_utf8_lossy(&fine.stderr));
}
