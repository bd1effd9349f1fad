//! `GET /v1/accounts/{account}/timeseries`: zero-filled, ascending, exact.

use serde_json::json;
use tally::domain::Role;

use crate::both;
use crate::helpers::TestApp;

both!(
    a_daily_series_is_zero_filled_and_counts_folded_and_unfolded_entries,
    a_monthly_series_runs_from_first_to_first,
    a_late_entry_for_a_folded_day_counts_before_the_next_rollup,
    bad_series_requests_are_422,
    a_reader_sees_only_its_own_series,
    an_unfolded_entry_at_the_first_instant_of_the_range_counts_in_its_first_point,
);

async fn a_daily_series_is_zero_filled_and_counts_folded_and_unfolded_entries(app: TestApp) {
    app.insert(&[
        ("acme", "agent_minutes", "1.5", "a", "2026-09-02T10:00:00Z"),
        ("acme", "agent_minutes", "0.25", "b", "2026-09-04T23:59:59.999Z"),
    ])
    .await;
    app.rollup().await;
    app.insert(&[("acme", "agent_minutes", "2", "c", "2026-09-04T00:00:00Z")])
        .await;
    let reply = app
        .get("/v1/accounts/acme/timeseries?resource=agent_minutes&granularity=day&from=2026-09-01&to=2026-09-06")
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(
        reply.body,
        json!({
            "account": "acme", "resource": "agent_minutes", "granularity": "day",
            "points": [
                {"start": "2026-09-01", "amount": "0"},
                {"start": "2026-09-02", "amount": "1.5"},
                {"start": "2026-09-03", "amount": "0"},
                {"start": "2026-09-04", "amount": "2.25"},
                {"start": "2026-09-05", "amount": "0"},
            ]
        })
    );
}

async fn a_monthly_series_runs_from_first_to_first(app: TestApp) {
    app.insert(&[
        ("acme", "api_requests", "5", "a", "2026-01-31T23:59:59Z"),
        ("acme", "api_requests", "7", "b", "2026-03-01T00:00:00Z"),
    ])
    .await;
    app.rollup().await;
    let reply = app
        .get("/v1/accounts/acme/timeseries?resource=api_requests&granularity=month&from=2026-01-01&to=2026-04-01")
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    let points: Vec<_> = reply.body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["start"].clone(), p["amount"].clone()))
        .collect();
    assert_eq!(
        points,
        [
            (json!("2026-01-01"), json!("5")),
            (json!("2026-02-01"), json!("0")),
            (json!("2026-03-01"), json!("7")),
        ]
    );
    // The CLI twin takes months as the HTTP one does.
    let cli = app.cli(&[
        "timeseries",
        "acme",
        "api_requests",
        "--granularity",
        "month",
        "--from",
        "2026-01",
        "--to",
        "2026-04",
    ]);
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    assert_eq!(
        String::from_utf8_lossy(&cli.stdout),
        "start,amount\n2026-01-01,5\n2026-02-01,0\n2026-03-01,7\n"
    );
}

async fn a_late_entry_for_a_folded_day_counts_before_the_next_rollup(app: TestApp) {
    app.insert(&[("acme", "api_requests", "5", "a", "2026-02-10T00:00:00Z")])
        .await;
    app.rollup().await;
    app.insert(&[("acme", "api_requests", "3", "late", "2026-02-10T12:00:00Z")])
        .await;
    assert_eq!(
        app.series_sum("acme", "api_requests", "2026-02-10", "2026-02-11", "day")
            .await,
        8
    );
    assert_eq!(
        app.series_sum("acme", "api_requests", "2026-02-01", "2026-03-01", "month")
            .await,
        8
    );
}

async fn bad_series_requests_are_422(app: TestApp) {
    for (query, field) in [
        ("resource=tokens&from=2026-01-01&to=2026-01-02", "resource"),
        ("resource=api_requests&from=2026-01-02&to=2026-01-01", "from"),
        ("resource=api_requests&from=2016-01-01&to=2026-01-11", "from"),
        (
            "resource=api_requests&granularity=month&from=2026-01-15&to=2026-03-01",
            "from",
        ),
        (
            "resource=api_requests&granularity=month&from=2026-01-01&to=2026-03-15",
            "to",
        ),
        (
            "resource=api_requests&granularity=week&from=2026-01-01&to=2026-03-01",
            "granularity",
        ),
        ("resource=api_requests&from=yesterday&to=2026-03-01", "from"),
        ("resource=api_requests&to=2026-03-01", "from"),
        ("resource=api_requests&from=2026-9-30&to=2026-10-02", "from"),
        ("resource=api_requests&from=2026-09-30&to=26-10-02", "to"),
    ] {
        let reply = app.get(&format!("/v1/accounts/acme/timeseries?{query}")).await;
        assert_eq!(reply.status, 422, "{query}: {:?}", reply.body);
        assert_eq!(
            reply.body["error"]["details"]["errors"][0]["field"], field,
            "{query}: {:?}",
            reply.body
        );
    }
    let most = app
        .get("/v1/accounts/acme/timeseries?resource=api_requests&from=2016-01-01&to=2026-01-08")
        .await;
    assert_eq!(most.status, 200, "3 660 points are allowed");
    assert_eq!(most.body["points"].as_array().unwrap().len(), 3660);
    let too_many_months = app
        .get("/v1/accounts/acme/timeseries?resource=api_requests&granularity=month&from=2000-01-01&to=2305-02-01")
        .await;
    assert_eq!(too_many_months.status, 422);
    let message = too_many_months.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("more than 3660 months; narrow the range"), "{message}");
    assert!(!message.contains("granularity=month"), "already by month: {message}");
    let empty = app
        .get("/v1/accounts/acme/timeseries?resource=api_requests&from=2026-01-01&to=2026-01-01")
        .await;
    assert_eq!(empty.status, 200, "to is exclusive: an empty range, {:?}", empty.body);
    assert_eq!(empty.body["points"], serde_json::json!([]));
}

async fn a_reader_sees_only_its_own_series(app: TestApp) {
    let key = app.key(Role::Reader, Some("acme")).await;
    let own = app
        .request(
            "GET",
            "/v1/accounts/acme/timeseries?resource=api_requests&from=2026-01-01&to=2026-01-02",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(own.status, 200);
    let other = app
        .request(
            "GET",
            "/v1/accounts/zeta/timeseries?resource=api_requests&from=2026-01-01&to=2026-01-02",
            Some(&key),
            None,
        )
        .await;
    assert_eq!(other.status, 403);
}

/// `from` is inclusive for the unfolded tail as for the folded totals: an
/// entry not yet rolled up at exactly 00:00:00Z of `from` counts in the first
/// point, by day and by month.
async fn an_unfolded_entry_at_the_first_instant_of_the_range_counts_in_its_first_point(app: TestApp) {
    app.insert(&[("acme", "api_requests", "4", "midnight", "2026-09-01T00:00:00Z")])
        .await;
    assert_eq!(
        app.series_sum("acme", "api_requests", "2026-09-01", "2026-09-02", "day")
            .await,
        4
    );
    assert_eq!(
        app.series_sum("acme", "api_requests", "2026-09-01", "2026-10-01", "month")
            .await,
        4
    );
}
