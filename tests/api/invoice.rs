//! How the invoice judges a day on which the plan changed.

use serde_json::json;

use crate::both;
use crate::helpers::TestApp;

both!(a_plan_change_mid_day_puts_the_whole_day_on_the_new_plan_as_consume_did);

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
