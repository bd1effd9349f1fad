//! The contract's JSON and CSV shapes, as insta snapshots with ids and times
//! redacted (DESIGN.md, "Tests"). Each answer is snapshotted with its status
//! and `Retry-After`, so a renamed field, a changed status or a reordered CSV
//! column shows up as a diff to review. Both engines compare against the same
//! snapshot file: where SQLite and PostgreSQL would answer differently, one of
//! them fails here.
//!
//! Where an answer depends on "now", the test freezes the app's clock, so
//! period bounds and defaulted `occurred_at` are fixed and stay in the
//! snapshots; only what the database assigns (ids, also where a message names
//! one, and `recorded_at`) and what the real clock decides (the rollup's lag)
//! is redacted, after checking its type.

use std::path::Path;

use chrono::{DateTime, Utc};
use insta::internals::Content;
use serde_json::{Value, json};

use crate::both;
use crate::helpers::{Reply, TestApp};

both!(
    ledger_answers_keep_the_contracts_shape,
    quota_answers_keep_the_contracts_shape,
    report_answers_keep_the_contracts_shape,
    csv_exports_keep_the_contracts_shape,
    cli_twins_print_what_the_api_answers,
    answers_send_their_fields_in_the_contracts_order,
);

/// What a snapshot of an answer holds: its status, the `Retry-After` a
/// client acts on (when sent), and its body.
fn answer(reply: &Reply) -> Value {
    let mut answer = json!({"status": reply.status});
    if let Some(retry_after) = reply.headers.get("retry-after") {
        answer["retry_after"] = json!(retry_after.to_str().unwrap());
    }
    answer["body"] = reply.body.clone();
    answer
}

/// A redaction that first checks the value is a whole number (an id the
/// database assigned), so that the snapshot still pins its type.
fn whole_number(placeholder: &'static str) -> insta::internals::Redaction {
    insta::dynamic_redaction(move |value, path| {
        let whole = matches!(value, Content::U64(_) | Content::I64(_));
        assert!(whole, "{path} is not a whole number: {value:?}");
        placeholder
    })
}

/// [`whole_number`] for a field that may also be null, which stays null.
fn whole_number_or_null(placeholder: &'static str) -> insta::internals::Redaction {
    insta::dynamic_redaction(move |value, path| match value {
        Content::U64(_) | Content::I64(_) => Content::from(placeholder),
        Content::None | Content::Unit => value,
        other => panic!("{path} is neither a whole number nor null: {other:?}"),
    })
}

/// A redaction that first checks the value is an RFC 3339 instant.
fn instant(placeholder: &'static str) -> insta::internals::Redaction {
    insta::dynamic_redaction(move |value, path| {
        let text = value
            .as_str()
            .unwrap_or_else(|| panic!("{path} is not a string: {value:?}"));
        assert!(
            DateTime::parse_from_rfc3339(text).is_ok(),
            "{path} is not RFC 3339: {text}"
        );
        placeholder
    })
}

/// Snapshots `reply` as `name`, with the database's ids and `recorded_at`
/// redacted wherever they appear.
fn assert_answer(name: &str, reply: &Reply) {
    let mut settings = insta::Settings::clone_current();
    settings.add_redaction(".**.id", whole_number("[id]"));
    settings.add_redaction(".**.entry_id", whole_number("[id]"));
    settings.add_redaction(".**.reverses", whole_number_or_null("[id]"));
    settings.add_redaction(".**.next_after_id", whole_number_or_null("[id]"));
    settings.add_redaction(".**.recorded_at", instant("[recorded_at]"));
    settings.add_redaction(".**.created_at", instant("[created_at]"));
    // Ids the messages name: PostgreSQL's sequence skips values a conflict
    // used, so they need not match SQLite's once a test grows.
    settings.add_filter(r"already used by entry \d+", "already used by entry [id]");
    settings.add_filter(r"entry \d+ is already reversed", "entry [id] is already reversed");
    settings.bind(|| insta::assert_json_snapshot!(name, answer(reply)));
}

/// Makes `at` (RFC 3339) the app's "now" until the test ends.
fn freeze(app: &TestApp, at: &str) {
    let instant: DateTime<Utc> = at.parse().unwrap();
    app.clock.freeze_at(instant);
}

async fn ledger_answers_keep_the_contracts_shape(app: TestApp) {
    freeze(&app, "2026-11-20T12:00:00Z");
    let first = json!({"account": "acme", "resource": "api_requests", "amount": 5, "idempotency_key": "k1",
                       "occurred_at": "2026-11-20T11:00:00Z", "source": "billing-api",
                       "metadata": {"region": "eu"}});
    let posted = app.post_entries(first.clone()).await;
    assert_answer("post_one_entry", &posted);
    let first_id = posted.body["entries"][0]["id"].as_i64().unwrap();

    let batch = json!({"entries": [
        first,
        {"account": "acme", "resource": "agent_minutes", "amount": "1.25", "idempotency_key": "k2"},
    ]});
    let again = app.post_entries(batch).await;
    assert_eq!(
        again.body["entries"][0]["id"], posted.body["entries"][0]["id"],
        "the duplicate names the first entry's id, which the snapshot redacts"
    );
    assert_answer("post_a_batch_with_a_duplicate", &again);

    let conflicting = json!({"account": "acme", "resource": "api_requests", "amount": 6, "idempotency_key": "k1",
                             "occurred_at": "2026-11-20T11:00:00Z"});
    assert_answer("post_an_idempotency_conflict", &app.post_entries(conflicting).await);

    let invalid = json!({"entries": [
        {"account": "acme", "resource": "api_requests", "amount": 1, "idempotency_key": "ok"},
        {"account": "bad account!", "resource": "tokens", "amount": "0", "idempotency_key": ""},
        {"account": "acme", "resource": "agent_minutes", "amount": "0.125", "idempotency_key": "k3",
         "occurred_at": "2026-11-21T12:00:00Z"},
    ]});
    assert_answer("post_invalid_entries", &app.post_entries(invalid).await);

    let reversal = json!({"idempotency_key": "r1", "reason": "refund"});
    let reversed = app.post(&format!("/v1/entries/{first_id}/reversal"), reversal).await;
    assert_answer("reverse_an_entry", &reversed);
    let again = app
        .post(
            &format!("/v1/entries/{first_id}/reversal"),
            json!({"idempotency_key": "r2", "reason": "refund again"}),
        )
        .await;
    assert_answer("reverse_an_entry_twice", &again);
    let unknown = app
        .post(
            "/v1/entries/999999999/reversal",
            json!({"idempotency_key": "r3", "reason": "?"}),
        )
        .await;
    assert_answer("reverse_an_unknown_entry", &unknown);

    assert_answer("list_entries", &app.get("/v1/accounts/acme/entries?limit=2").await);

    let no_key = app.request("GET", "/v1/accounts/acme/entries", None, None).await;
    assert_answer("no_key", &no_key);
    let reader = app.key(tally::domain::Role::Reader, Some("globex")).await;
    let other_account = app
        .request("GET", "/v1/accounts/acme/entries", Some(&reader), None)
        .await;
    assert_answer("a_reader_of_another_account", &other_account);
    let malformed = app
        .request(
            "POST",
            "/v1/entries",
            Some(&app.admin_key),
            Some("{\"account\": ".into()),
        )
        .await;
    assert_answer("a_malformed_body", &malformed);
    assert_answer("an_unknown_route", &app.get("/v1/nowhere").await);
    // None of the refused requests wrote: the first entry, k2 and the reversal.
    assert_eq!(app.count_entries().await, 3);
}

async fn quota_answers_keep_the_contracts_shape(app: TestApp) {
    // The last 30 s of a month: a day and a month window both end in 30 s.
    freeze(&app, "2026-11-30T23:59:30Z");
    let consume = |account: &str, resource: &str, amount: &str, key: &str| {
        let body = json!({"account": account, "resource": resource, "amount": amount, "idempotency_key": key});
        let app = &app;
        async move { app.post("/v1/quota/consume", body).await }
    };
    let check = app
        .post(
            "/v1/quota/check",
            json!({"account": "acme", "resource": "api_requests", "amount": 10}),
        )
        .await;
    assert_answer("check", &check);
    let at_an_instant = app
        .post(
            "/v1/quota/check",
            json!({"account": "acme", "resource": "llm_tokens", "at": "2026-11-02T08:00:00Z"}),
        )
        .await;
    assert_answer("check_at_an_instant", &at_an_instant);

    assert_answer(
        "consume_up_to_a_hard_limit",
        &consume("acme", "ai_generations", "50", "g1").await,
    );
    assert_answer(
        "consume_past_a_hard_month_limit",
        &consume("acme", "ai_generations", "1", "g2").await,
    );
    assert_answer(
        "consume_past_a_hard_total_limit",
        &consume("acme", "storage_bytes", "26843545601", "s1").await,
    );

    let pro = app
        .put_admin(
            "/v1/accounts/soft/plan",
            json!({"plan": "pro", "effective_at": "2026-11-01T00:00:00Z"}),
        )
        .await;
    assert_answer("put_a_plan", &pro);
    let first = consume("soft", "llm_tokens", "50001", "t1").await;
    assert_answer("consume_past_a_soft_limit", &first);
    let replayed = consume("soft", "llm_tokens", "50001", "t1").await;
    // The snapshot redacts entry_id: the replay must name the first entry and record nothing.
    assert_eq!(replayed.body, first.body);
    assert_eq!(app.ledger_sum("soft", "llm_tokens").await, 50_001);
    assert_answer("consume_replayed", &replayed);

    // A burst of 100, then one more every 600 ms of the real clock the burst
    // took (the limiter's clock is not the app's): consume until refused.
    let mut consumed = 0;
    let rate_limited = loop {
        let reply = consume("busy", "api_requests", "1", &format!("b{consumed}")).await;
        if reply.status != 200 {
            break reply;
        }
        consumed += 1;
        assert!(consumed <= 200, "no rate limit after 200 consumes");
    };
    assert!(consumed >= 100, "refused after {consumed}");
    assert_answer("consume_past_a_rate_limit", &rate_limited);
    assert_answer(
        "consume_an_unknown_resource",
        &consume("acme", "tokens", "1", "u1").await,
    );
    assert_answer("consume_nothing", &consume("acme", "llm_tokens", "0", "z1").await);

    let override_body = json!({"limit": "2000", "enforcement": "soft", "expires_at": "2027-01-01T00:00:00Z"});
    assert_answer(
        "put_an_override",
        &app.put_admin("/v1/accounts/acme/overrides/llm_tokens", override_body)
            .await,
    );
    assert_answer(
        "put_a_bad_override",
        &app.put_admin(
            "/v1/accounts/acme/overrides/llm_tokens",
            json!({"limit": "-5", "enforcement": "firm"}),
        )
        .await,
    );
    assert_answer("an_account", &app.get("/v1/accounts/acme").await);
    assert_answer(
        "delete_an_override",
        &app.delete_admin("/v1/accounts/acme/overrides/llm_tokens").await,
    );
    // The removed override stays in the history, which past checks follow.
    assert_answer(
        "an_account_after_its_override_is_removed",
        &app.get("/v1/accounts/acme").await,
    );
    assert_answer("a_feature", &app.get("/v1/accounts/soft/features/git_export").await);
    assert_answer(
        "an_unknown_feature",
        &app.get("/v1/accounts/soft/features/teleport").await,
    );
    assert_answer("the_plans", &app.get("/v1/plans").await);
}

/// A small ledger over October 2026, folded, for the read-only reports.
async fn seed_october(app: &TestApp) {
    app.insert(&[
        ("acme", "api_requests", "100", "a1", "2026-10-01T00:00:00Z"),
        ("acme", "api_requests", "250", "a2", "2026-10-01T23:59:59.999Z"),
        ("acme", "agent_minutes", "1.25", "a3", "2026-10-02T10:00:00Z"),
        ("acme", "storage_bytes", "4096", "a4", "2026-10-03T12:00:00Z"),
        ("globex", "api_requests", "7", "g1", "2026-10-31T23:59:59Z"),
        ("globex", "api_requests", "-2", "g2", "2026-10-03T00:00:00Z"),
        ("globex", "llm_tokens", "60000", "g3", "2026-10-15T09:30:00Z"),
    ])
    .await;
    let pro = app
        .put_admin(
            "/v1/accounts/globex/plan",
            json!({"plan": "pro", "effective_at": "2026-10-16T00:00:00Z"}),
        )
        .await;
    assert_eq!(pro.status, 200, "{:?}", pro.body);
    app.rollup().await;
}

async fn report_answers_keep_the_contracts_shape(app: TestApp) {
    freeze(&app, "2026-11-20T12:00:00Z");
    seed_october(&app).await;
    assert_answer(
        "timeseries_by_day",
        &app.get("/v1/accounts/acme/timeseries?resource=api_requests&granularity=day&from=2026-09-30&to=2026-10-04")
            .await,
    );
    assert_answer(
        "timeseries_by_month",
        &app.get("/v1/accounts/acme/timeseries?resource=agent_minutes&granularity=month&from=2026-09-01&to=2026-12-01")
            .await,
    );
    assert_answer(
        "timeseries_too_long",
        &app.get("/v1/accounts/acme/timeseries?resource=api_requests&granularity=day&from=2000-01-01&to=2026-01-01")
            .await,
    );
    assert_answer("admin_stats", &app.get("/v1/admin/stats?period=2026-10").await);
    assert_answer(
        "admin_top",
        &app.get("/v1/admin/top?resource=api_requests&period=2026-10&limit=5")
            .await,
    );
    let health = app.request("GET", "/healthz", None, None).await;
    let mut settings = insta::Settings::clone_current();
    settings.add_redaction(".body.rollup_lag_seconds", whole_number_or_null("[seconds]"));
    settings.bind(|| insta::assert_json_snapshot!("healthz", answer(&health)));
}

/// A CSV column to redact, and the check each of its values must pass.
type RedactedColumn<'a> = (&'a str, fn(&str) -> bool);

/// The CSV file at `path`, the values of its `redacted` columns (by header)
/// replaced by `[column]` after checking that each is `well_formed`; empty
/// values stay empty, so that the snapshot still tells which rows have one.
///
/// The snapshot is written back by the csv crate; so that it still pins the
/// file's own bytes, the file must equal what that writer makes of its
/// records: UTF-8 without a byte-order mark, `\n` after every record, a
/// field in double quotes only when it needs them (docs/reports.md).
fn redacted_csv(path: &Path, redacted: &[RedactedColumn]) -> String {
    let raw = std::fs::read(path).unwrap();
    let mut reader = csv::Reader::from_reader(raw.as_slice());
    let header = reader.headers().unwrap().clone();
    let mut same = csv::Writer::from_writer(Vec::new());
    let mut snapshot = csv::Writer::from_writer(Vec::new());
    same.write_record(&header).unwrap();
    snapshot.write_record(&header).unwrap();
    for record in reader.records() {
        let record = record.unwrap();
        same.write_record(&record).unwrap();
        let fields = header.iter().zip(record.iter()).map(|(column, value)| {
            match redacted.iter().find(|(name, _)| *name == column) {
                Some((_, well_formed)) => {
                    assert!(well_formed(value), "{column} = {value:?} in {}", path.display());
                    if value.is_empty() {
                        String::new()
                    } else {
                        format!("[{column}]")
                    }
                }
                None => value.to_owned(),
            }
        });
        snapshot.write_record(fields.collect::<Vec<_>>()).unwrap();
    }
    assert_eq!(
        String::from_utf8_lossy(&same.into_inner().unwrap()),
        String::from_utf8_lossy(&raw),
        "{} is not byte for byte what a plain RFC 4180 writer makes of its records",
        path.display()
    );
    String::from_utf8(snapshot.into_inner().unwrap()).unwrap()
}

fn is_id(value: &str) -> bool {
    value.parse::<i64>().is_ok_and(|id| id > 0)
}

fn is_instant(value: &str) -> bool {
    DateTime::parse_from_rfc3339(value).is_ok()
}

async fn csv_exports_keep_the_contracts_shape(app: TestApp) {
    // The reversal below keeps its entry's occurred_at (20 October), which the
    // app takes only within its late-arrival horizon: a clock in late October.
    freeze(&app, "2026-10-25T12:00:00Z");
    seed_october(&app).await;
    let reversed = app
        .insert(&[("acme", "llm_tokens", "900", "a5", "2026-10-20T08:00:00Z")])
        .await[0];
    let reversal = app
        .post(
            &format!("/v1/entries/{reversed}/reversal"),
            json!({"idempotency_key": "a5-undo", "reason": "double count"}),
        )
        .await;
    assert_eq!(reversal.status, 200, "{:?}", reversal.body);
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, args: &[&str]| {
        let path = dir.path().join(name);
        let mut all = args.to_vec();
        all.extend(["-o", path.to_str().unwrap()]);
        let output = app.cli(&all);
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        path
    };
    let entries = run(
        "entries.csv",
        &["export", "entries", "--from", "2026-10-01", "--to", "2026-11-01"],
    );
    let entries_csv = redacted_csv(
        &entries,
        &[
            ("id", is_id),
            ("recorded_at", is_instant),
            ("reverses", |v| v.is_empty() || is_id(v)),
        ],
    );
    insta::assert_snapshot!("export_entries_csv", entries_csv);

    let daily = run(
        "daily.csv",
        &["export", "daily", "--from", "2026-10-01", "--to", "2026-11-01"],
    );
    insta::assert_snapshot!("export_daily_csv", redacted_csv(&daily, &[]));
    let monthly = run(
        "monthly.csv",
        &["export", "monthly", "--from", "2026-10-01", "--to", "2026-11-01"],
    );
    insta::assert_snapshot!("export_monthly_csv", redacted_csv(&monthly, &[]));
    let invoice = run("invoice.csv", &["export", "invoice", "--period", "2026-10"]);
    insta::assert_snapshot!("export_invoice_csv", redacted_csv(&invoice, &[]));
}

/// The JSON a CLI twin prints (API.md: "every read above has a CLI twin").
fn cli_json(app: &TestApp, args: &[&str]) -> Value {
    let output = app.cli(args);
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?} printed no JSON ({e}); stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

async fn cli_twins_print_what_the_api_answers(app: TestApp) {
    seed_october(&app).await;
    let at = "2026-10-20T12:00:00Z";
    let pairs = [
        (
            vec!["check", "globex", "llm_tokens", "5", "--at", at],
            app.post(
                "/v1/quota/check",
                json!({"account": "globex", "resource": "llm_tokens", "amount": "5", "at": at}),
            )
            .await,
        ),
        (
            vec!["usage", "acme", "--at", at],
            app.get(&format!("/v1/accounts/acme/usage?at={at}")).await,
        ),
        (
            vec!["feature", "globex", "git_export", "--at", at],
            app.get(&format!("/v1/accounts/globex/features/git_export?at={at}"))
                .await,
        ),
        (vec!["accounts", "show", "globex"], app.get("/v1/accounts/globex").await),
        (
            vec!["stats", "--period", "2026-10"],
            app.get("/v1/admin/stats?period=2026-10").await,
        ),
        (
            vec!["top", "--resource", "api_requests", "--period", "2026-10"],
            app.get("/v1/admin/top?resource=api_requests&period=2026-10").await,
        ),
    ];
    for (args, reply) in pairs {
        assert_eq!(reply.status, 200, "{args:?}: {:?}", reply.body);
        assert_eq!(cli_json(&app, &args), reply.body, "{args:?}");
    }
    // The series' twin prints CSV, for analysts: the same points.
    let series = app
        .get("/v1/accounts/acme/timeseries?resource=api_requests&granularity=day&from=2026-09-30&to=2026-10-04")
        .await;
    let mut expected = String::from("start,amount\n");
    for point in series.body["points"].as_array().unwrap() {
        expected += &format!(
            "{},{}\n",
            point["start"].as_str().unwrap(),
            point["amount"].as_str().unwrap()
        );
    }
    let printed = app.cli(&[
        "timeseries",
        "acme",
        "api_requests",
        "--granularity",
        "day",
        "--from",
        "2026-09-30",
        "--to",
        "2026-10-04",
    ]);
    assert_eq!(String::from_utf8_lossy(&printed.stdout), expected);
}

/// Asserts that `keys` first appear in `text` in the order given.
fn assert_in_order(text: &str, keys: &[&str]) {
    let at: Vec<usize> = keys
        .iter()
        .map(|key| {
            text.find(&format!("\"{key}\":"))
                .unwrap_or_else(|| panic!("no {key:?} in {text}"))
        })
        .collect();
    assert!(at.is_sorted(), "expected {keys:?} in this order: {text}");
}

/// JSON's order is not meaning, but the contract writes its fields in an
/// order and a reader of a raw answer (curl, a log) reads them in it. The
/// snapshots cannot see it: they compare parsed, sorted bodies. Review W:
/// every error sent `details` before `message`.
async fn answers_send_their_fields_in_the_contracts_order(app: TestApp) {
    let invalid = app
        .post_entries(json!({"entries": [{"account": "acme", "resource": "api_requests", "amount": 0}]}))
        .await;
    assert_eq!(invalid.status, 422);
    assert_in_order(&invalid.text, &["error", "code", "message", "details"]);
    let errors = &invalid.text[invalid.text.find("\"errors\"").unwrap()..];
    assert_in_order(errors, &["index", "field", "code", "message"]);

    app.put_admin("/v1/accounts/acme/overrides/ai_generations", json!({"limit": "1"}))
        .await;
    let consume = |key: &'static str| {
        app.post(
            "/v1/quota/consume",
            json!({"account": "acme", "resource": "ai_generations", "amount": 1, "idempotency_key": key}),
        )
    };
    assert_eq!(consume("c1").await.status, 200);
    let refused = consume("c2").await;
    assert_eq!(refused.status, 429);
    let check_order = [
        "allowed",
        "account",
        "resource",
        "plan",
        "window",
        "used",
        "limit",
        "remaining",
        "enforcement",
        "period_start",
        "period_end",
        "status",
    ];
    let details = &refused.text[refused.text.find("\"details\"").unwrap()..];
    assert_in_order(details, &check_order);
    assert_in_order(&refused.text, &["code", "message", "details"]);

    let health = app.request("GET", "/healthz", None, None).await;
    assert_in_order(&health.text, &["status", "database", "rollup_lag_seconds"]);
    let top = app.get("/v1/admin/top?resource=ai_generations").await;
    assert_eq!(top.status, 200, "{:?}", top.body);
    assert_in_order(&top.text, &["period", "resource", "accounts"]);
    // Review Y: the DELETE of an override came back sorted.
    let set = app
        .put_admin("/v1/accounts/acme/overrides/llm_tokens", json!({"limit": "5"}))
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    let deleted = app.delete_admin("/v1/accounts/acme/overrides/llm_tokens").await;
    assert_eq!(deleted.status, 200, "{:?}", deleted.body);
    assert_in_order(&deleted.text, &["account", "resource", "deleted"]);
}
