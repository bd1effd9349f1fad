//! How the invoice judges each day: by the plan and overrides in force when
//! it closed, whatever changed later.

use serde_json::json;

use crate::both;
use crate::helpers::TestApp;

both!(
    a_plan_change_mid_day_puts_the_whole_day_on_the_new_plan_as_consume_did,
    an_override_set_after_the_month_leaves_its_invoice_unchanged,
    month_window_overage_is_billed_on_the_day_it_happens_so_a_last_day_plan_change_neither_waives_nor_adds_it,
    an_invoice_whose_month_passes_64_bits_though_each_day_fits_fails_for_that_account_only,
);
both!(plans = ENTERPRISE_PLANS; a_day_window_overage_is_billed_though_the_last_plan_does_not_limit_the_resource);
both!(plans = TWO_PRICES;
    a_correction_takes_back_the_latest_billed_excess_at_the_price_it_was_billed_at,
    exports_say_when_the_catalog_lacks_a_plan_or_a_resource_they_meet,
);

/// The September invoice of `account` as CSV lines.
fn september(app: &TestApp, account: &str) -> Vec<String> {
    let output = app.cli(&["export", "invoice", "--period", "2026-09", "--account", account]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// An override set in December is not in force on any September day, so a
/// re-export of September bills as before (it once applied the overrides as
/// they are now).
async fn an_override_set_after_the_month_leaves_its_invoice_unchanged(app: TestApp) {
    app.put_admin(
        "/v1/accounts/acme/plan",
        json!({"plan": "pro", "effective_at": "2026-01-01T00:00:00Z"}),
    )
    .await;
    app.insert(&[("acme", "llm_tokens", "60000", "t1", "2026-09-20T10:00:00Z")])
        .await;
    let before = september(&app, "acme");
    let billed = "acme,pro,llm_tokens,60000,50000,10000,0.00002,0.2".to_owned();
    assert!(before.contains(&billed), "{before:?}");
    for limit in ["100000", "1"] {
        let set = app
            .put_admin("/v1/accounts/acme/overrides/llm_tokens", json!({"limit": limit}))
            .await;
        assert_eq!(set.status, 200, "{:?}", set.body);
        assert_eq!(september(&app, "acme"), before, "override {limit} set now");
    }
}

/// Month windows are judged day by day, as consume judged them: what a day
/// adds to the month's excess over that day's limit, at that day's price.
/// `down` used 20 M requests on scale (soft 10 M at 0.000001) and moved to
/// pro on the last day: the 10 M over stay billed (judged by the last day
/// alone they were 19 M over pro's hard limit, billed at 0). `up` used them
/// on pro and moved to scale on the last day: the excess stays pro's, at 0.
/// `fixed` corrected 15 M of its 20 M later in the month: nothing is over.
async fn month_window_overage_is_billed_on_the_day_it_happens_so_a_last_day_plan_change_neither_waives_nor_adds_it(
    app: TestApp,
) {
    for (account, first, last) in [
        ("down", "scale", "pro"),
        ("up", "pro", "scale"),
        ("fixed", "scale", "scale"),
    ] {
        for (plan, from) in [(first, "2026-01-01T00:00:00Z"), (last, "2026-09-30T00:00:00Z")] {
            let set = app
                .put_admin(
                    &format!("/v1/accounts/{account}/plan"),
                    json!({"plan": plan, "effective_at": from}),
                )
                .await;
            assert_eq!(set.status, 200, "{:?}", set.body);
        }
    }
    app.insert(&[
        ("down", "api_requests", "20000000", "d", "2026-09-05T10:00:00Z"),
        ("up", "api_requests", "20000000", "u", "2026-09-25T10:00:00Z"),
        ("fixed", "api_requests", "20000000", "f", "2026-09-05T10:00:00Z"),
        ("fixed", "api_requests", "-15000000", "f-fix", "2026-09-20T10:00:00Z"),
    ])
    .await;
    app.rollup().await;
    let down = september(&app, "down");
    assert!(
        down.contains(&"down,pro,api_requests,20000000,1000000,10000000,0,10".to_owned()),
        "{down:?}"
    );
    let up = september(&app, "up");
    assert!(
        up.contains(&"up,scale,api_requests,20000000,10000000,19000000,0.000001,0".to_owned()),
        "{up:?}"
    );
    let fixed = september(&app, "fixed");
    assert!(
        fixed.contains(&"fixed,scale,api_requests,5000000,10000000,0,0.000001,0".to_owned()),
        "{fixed:?}"
    );
}

/// `enterprise` limits only api_requests: on its days llm_tokens are
/// unlimited, but the days on pro before still owe their daily excess.
const ENTERPRISE_PLANS: &str = r#"
default_plan = "pro"

[resources.api_requests]
decimals = 0

[resources.llm_tokens]
decimals = 0

[plans.pro]
price = "10"

[plans.pro.limits.llm_tokens]
window = "day"
limit = "50000"
enforcement = "soft"
overage_price = "0.00002"

[plans.enterprise]
price = "100"

[plans.enterprise.limits.api_requests]
window = "month"
limit = "1000"
enforcement = "hard"
"#;

/// 90 000 tokens on pro's 50 000/day soft limit on the 10th: 40 000 over at
/// 0.00002 = 0.8, though the month ends on enterprise, which does not limit
/// llm_tokens (the line shows enterprise's terms: unlimited, price 0). It
/// once read the window from the last day only, and billed nothing.
async fn a_day_window_overage_is_billed_though_the_last_plan_does_not_limit_the_resource(app: TestApp) {
    app.put_admin(
        "/v1/accounts/ent/plan",
        json!({"plan": "enterprise", "effective_at": "2026-09-30T00:00:00Z"}),
    )
    .await;
    app.insert(&[("ent", "llm_tokens", "90000", "t", "2026-09-10T10:00:00Z")])
        .await;
    let lines = september(&app, "ent");
    assert!(
        lines.contains(&"ent,enterprise,llm_tokens,90000,unlimited,40000,0,0.8".to_owned()),
        "{lines:?}"
    );
}

/// Upgraded to pro at 17:29 on 2026-09-20, the account consumes 55 000
/// llm_tokens at 18:00; consume judged them against pro's 50 000/day soft
/// limit and promised overage at 0.00002. The invoice agrees: the day is on
/// pro (its price and its limit), 5 000 over, 0.1 due. Judged by the plan at
/// 00:00 (free, hard 1 000) it showed 54 000 over at price 0.
async fn a_plan_change_mid_day_puts_the_whole_day_on_the_new_plan_as_consume_did(app: TestApp) {
    let set = app
        .put_admin(
            "/v1/accounts/acme/plan",
            json!({"plan": "pro", "effective_at": "2026-09-20T17:29:00Z"}),
        )
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    app.insert(&[("acme", "llm_tokens", "55000", "t1", "2026-09-20T18:00:00Z")])
        .await;
    let output = app.cli(&["export", "invoice", "--period", "2026-09", "--account", "acme"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let csv = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    // September has 30 days; the 20th to the 30th (11 days) are on pro at 10 a month.
    assert!(
        lines.contains(&"acme,pro,plan,11,30,,10,3.6666666666666666666666666667"),
        "{csv}"
    );
    assert!(
        lines.contains(&"acme,pro,llm_tokens,55000,50000,5000,0.00002,0.1"),
        "{csv}"
    );
}

/// Each day's total fits in 64 bits of minor units, but the month's sum does
/// not (60 + 60 entries of the largest agent_minutes, 93 pass 2^63 − 1): the
/// invoice of that account fails with the 64-bit error and its runbook, never
/// a wrapped number, and another account's invoice is made as usual.
async fn an_invoice_whose_month_passes_64_bits_though_each_day_fits_fails_for_that_account_only(app: TestApp) {
    let rows: Vec<(String, String)> = (0..120)
        .map(|i| (format!("w{i}"), format!("2026-09-{:02}T12:00:00Z", 2 + i / 60)))
        .collect();
    let mut rows: Vec<_> = rows
        .iter()
        .map(|(key, at)| {
            (
                "whale",
                "agent_minutes",
                "999999999999999.99",
                key.as_str(),
                at.as_str(),
            )
        })
        .collect();
    rows.push(("minnow", "api_requests", "7", "m1", "2026-09-02T12:00:00Z"));
    app.insert(&rows).await;
    app.rollup().await;
    let whale = app.cli(&["export", "invoice", "--period", "2026-09", "--account", "whale"]);
    assert!(!whale.status.success(), "{}", String::from_utf8_lossy(&whale.stdout));
    let said = String::from_utf8_lossy(&whale.stderr);
    assert!(
        said.contains("64-bit range") && said.contains("docs/operations.md"),
        "{said}"
    );
    assert!(!said.contains("panicked"), "{said}");
    let minnow = september(&app, "minnow");
    assert!(
        minnow
            .iter()
            .any(|line| line.starts_with("minnow,free,api_requests,7,")),
        "{minnow:?}"
    );
}

/// Two plans with the same soft limit of 100 requests a month, at different
/// overage prices.
const TWO_PRICES: &str = r#"
default_plan = "dear"

[resources.api_requests]
decimals = 0

[resources.gpu_minutes]
decimals = 2

[plans.dear]
price = "0"

[plans.dear.limits.api_requests]
window = "month"
limit = "100"
enforcement = "soft"
overage_price = "2"

[plans.daily]
price = "0"

[plans.daily.limits.api_requests]
window = "day"
limit = "10"
enforcement = "soft"
overage_price = "5"

[plans.cheap]
price = "0"

[plans.cheap.limits.api_requests]
window = "month"
limit = "100"
enforcement = "soft"
overage_price = "1"
"#;

/// 150 requests on the 5th (50 over), a correction of −30 on the 12th after
/// a plan change on the 10th: 20 units stay over, billed at the price of the
/// day they were used. It once took the 30 back at the new day's price:
/// `down` (dear, then cheap) owed 50 × 2 − 30 × 1 = 70 for 20 units over, and
/// `up` (cheap, then dear) owed 50 × 1 − 30 × 2, floored at 0, for 20 units
/// really over.
async fn a_correction_takes_back_the_latest_billed_excess_at_the_price_it_was_billed_at(app: TestApp) {
    for (account, first, second) in [("down", "dear", "cheap"), ("up", "cheap", "dear")] {
        for (plan, from) in [(first, "2026-09-01T00:00:00Z"), (second, "2026-09-10T00:00:00Z")] {
            let set = app
                .put_admin(
                    &format!("/v1/accounts/{account}/plan"),
                    json!({"plan": plan, "effective_at": from}),
                )
                .await;
            assert_eq!(set.status, 200, "{:?}", set.body);
        }
        app.insert(&[
            (account, "api_requests", "150", "used", "2026-09-05T10:00:00Z"),
            (account, "api_requests", "-30", "fix", "2026-09-12T10:00:00Z"),
        ])
        .await;
    }
    let down = september(&app, "down");
    assert!(
        down.contains(&"down,cheap,api_requests,120,100,20,1,40".to_owned()),
        "{down:?}"
    );
    let up = september(&app, "up");
    assert!(
        up.contains(&"up,dear,api_requests,120,100,20,2,20".to_owned()),
        "{up:?}"
    );

    // Day-window excess is each day's own: 140 over 10 on the 5th at 5 stays
    // billed (700) when a month window from the 10th sees the −30 as excess
    // going back (it once took 30 of the day's units back, at 5).
    for (plan, from) in [("daily", "2026-09-01T00:00:00Z"), ("dear", "2026-09-10T00:00:00Z")] {
        let set = app
            .put_admin("/v1/accounts/days/plan", json!({"plan": plan, "effective_at": from}))
            .await;
        assert_eq!(set.status, 200, "{:?}", set.body);
    }
    app.insert(&[
        ("days", "api_requests", "150", "used", "2026-09-05T10:00:00Z"),
        ("days", "api_requests", "-30", "fix", "2026-09-12T10:00:00Z"),
    ])
    .await;
    let days = september(&app, "days");
    assert!(
        days.contains(&"days,dear,api_requests,120,100,140,2,700".to_owned()),
        "{days:?}"
    );
}

/// Run without `--plans`, the CLI reads the built-in catalog, which has
/// neither the plan `cheap` nor the resource `gpu_minutes`: the invoice and
/// stats billed the plan 0, and the entries export wrote 1.25 minutes as 125,
/// all without a word. They still do (the catalog decides), but say so.
async fn exports_say_when_the_catalog_lacks_a_plan_or_a_resource_they_meet(app: TestApp) {
    let set = app
        .put_admin(
            "/v1/accounts/gpu/plan",
            json!({"plan": "cheap", "effective_at": "2026-09-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    app.insert(&[("gpu", "gpu_minutes", "1.25", "g1", "2026-09-05T10:00:00Z")])
        .await;
    let builtin = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .env("TALLY_DATABASE_URL", &app.database_url)
            .env_remove("TALLY_PLANS")
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        (
            String::from_utf8(output.stdout).unwrap(),
            String::from_utf8(output.stderr).unwrap(),
        )
    };
    let (_, invoice) = builtin(&["export", "invoice", "--period", "2026-09"]);
    assert!(
        invoice.contains("plan 'cheap' is not in the catalog, yet 1 account(s) were on it in 2026-09"),
        "{invoice}"
    );
    let (stats, said) = builtin(&["stats", "--period", "2026-09"]);
    assert!(said.contains("plan 'cheap' is not in the catalog"), "{said}");
    assert!(said.contains("resource 'gpu_minutes' is not in the catalog"), "{said}");
    assert!(stats.contains("\"125\""), "minor units, as said: {stats}");
    let (_, said) = builtin(&[
        "timeseries",
        "gpu",
        "gpu_minutes",
        "--from",
        "2026-09-01",
        "--to",
        "2026-09-08",
    ]);
    assert!(said.contains("resource 'gpu_minutes' is not in the catalog"), "{said}");
    let (entries, said) = builtin(&["export", "entries", "--from", "2026-09-01", "--to", "2026-10-01"]);
    assert!(entries.contains(",gpu,gpu_minutes,125,"), "{entries}");
    assert!(said.contains("resource 'gpu_minutes' is not in the catalog"), "{said}");
    let lines = said.lines().filter(|l| l.contains("gpu_minutes")).count();
    assert_eq!(lines, 1, "said once: {said}");
    // Review AL: the account view prints an override's limit in minor units
    // too, and now says so.
    let set = app
        .put_admin("/v1/accounts/gpu/overrides/gpu_minutes", json!({"limit": "12.5"}))
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    let (view, said) = builtin(&["accounts", "show", "gpu"]);
    assert!(view.contains("\"limit\": \"1250\""), "{view}");
    assert!(said.contains("resource 'gpu_minutes' is not in the catalog"), "{said}");
    assert_eq!(
        said.lines().filter(|l| l.contains("gpu_minutes")).count(),
        1,
        "said once: {said}"
    );
}
