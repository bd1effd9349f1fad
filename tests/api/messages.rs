//! Error messages say what went wrong and what to do next (review D6, D7):
//! each test pins the part of a message that once misled or left the
//! client without a next step.

use serde_json::{Value, json};

use crate::both;
use crate::helpers::{TestApp, days_ago_at};

both!(
    a_consume_of_a_resource_the_plan_does_not_include_names_the_plans_that_do,
    a_consume_under_an_override_of_0_says_the_override_decides,
    a_consume_body_over_10_mib_speaks_of_one_entry_not_batches,
    an_amount_of_the_wrong_json_type_is_named_by_its_type,
    a_reused_consume_key_names_each_field_that_differs_and_both_values,
    an_effective_at_or_expires_at_out_of_range_speaks_of_that_field,
    set_plan_says_the_plan_in_force_now_when_a_later_assignment_overtakes_it,
    an_amount_of_zero_on_check_or_consume_says_what_to_do_instead,
    check_amounts_are_refused_alike_over_http_and_on_the_command_line,
    an_occurred_at_out_of_bounds_says_what_to_send_instead_and_a_consume_is_not_told_to_backfill,
    a_path_that_is_not_utf_8_names_its_part_without_axum_text,
);

both!(plans = SEAT_PLANS; a_numeric_feature_is_a_number_on_every_plan);

fn message(reply: &crate::helpers::Reply) -> String {
    reply.body["error"]["message"].as_str().unwrap_or_default().to_owned()
}

fn consume(account: &str, resource: &str, amount: Value, key: &str) -> Value {
    json!({"account": account, "resource": resource, "amount": amount, "idempotency_key": key})
}

/// Free's `agent_minutes` limit is 0: no smaller amount and no wait helps,
/// another plan or an override does.
async fn a_consume_of_a_resource_the_plan_does_not_include_names_the_plans_that_do(app: TestApp) {
    let reply = app
        .post("/v1/quota/consume", consume("acme", "agent_minutes", json!("1"), "k1"))
        .await;
    assert_eq!(
        (reply.status, reply.code()),
        (429, "quota_exceeded"),
        "{:?}",
        reply.body
    );
    assert!(reply.headers.get("retry-after").is_none());
    let message = message(&reply);
    assert!(
        message.starts_with("plan 'free' does not include agent_minutes (its limit is 0)"),
        "{message}"
    );
    assert!(
        message.contains("move account 'acme' to a plan that does (pro, scale) with PUT /v1/accounts/acme/plan"),
        "{message}"
    );
    assert!(
        message.contains("PUT /v1/accounts/acme/overrides/agent_minutes"),
        "{message}"
    );
    assert!(!message.contains("consume less"), "{message}");
    assert_eq!(app.count_entries().await, 0);
}

async fn a_consume_under_an_override_of_0_says_the_override_decides(app: TestApp) {
    app.put_admin("/v1/accounts/acme/plan", json!({"plan": "pro"})).await;
    let set = app
        .put_admin("/v1/accounts/acme/overrides/agent_minutes", json!({"limit": "0"}))
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    let reply = app
        .post("/v1/quota/consume", consume("acme", "agent_minutes", json!("1"), "k1"))
        .await;
    assert_eq!(
        (reply.status, reply.code()),
        (429, "quota_exceeded"),
        "{:?}",
        reply.body
    );
    let message = message(&reply);
    assert!(
        message.starts_with("an override of account 'acme' sets the agent_minutes limit to 0 (on plan 'pro')"),
        "{message}"
    );
    assert!(
        message.contains("DELETE /v1/accounts/acme/overrides/agent_minutes"),
        "{message}"
    );
}

/// A consume is one entry: "split it into smaller batches" fits only
/// `POST /v1/entries`, which keeps saying it.
async fn a_consume_body_over_10_mib_speaks_of_one_entry_not_batches(app: TestApp) {
    let mut body = consume("acme", "api_requests", json!("1"), "k1");
    body["metadata"] = json!({"note": "x".repeat(11 * 1024 * 1024)});
    let reply = app.post("/v1/quota/consume", body.clone()).await;
    assert_eq!(
        (reply.status, reply.code()),
        (413, "payload_too_large"),
        "{:?}",
        reply.body
    );
    let text = message(&reply);
    assert!(
        text.starts_with("the request body is over 10 MiB (10485760 bytes)"),
        "{text}"
    );
    assert!(text.contains("metadata may hold at most 4096 bytes"), "{text}");
    assert!(!text.contains("batch"), "{text}");

    let entries = app.post_entries(body).await;
    assert_eq!(entries.status, 413);
    assert!(
        message(&entries).contains("split the entries into smaller batches"),
        "{:?}",
        entries.body
    );
    assert_eq!(app.count_entries().await, 0);
}

/// `true` is not a number a client got wrong: it is another JSON type, and
/// the message says which, on check as on consume and entries.
async fn an_amount_of_the_wrong_json_type_is_named_by_its_type(app: TestApp) {
    let wanted = "amount must be a decimal string or a JSON number, such as \"1500\" or 0.25; got ";
    for (amount, got) in [
        (json!(true), "a boolean (true)"),
        (json!(false), "a boolean (false)"),
        (json!({"value": 1}), "an object"),
        (json!([1]), "an array"),
    ] {
        let check = app
            .post(
                "/v1/quota/check",
                json!({"account": "acme", "resource": "api_requests", "amount": amount}),
            )
            .await;
        let consumed = app
            .post(
                "/v1/quota/consume",
                consume("acme", "api_requests", amount.clone(), "k1"),
            )
            .await;
        let posted = app
            .post_entries(consume("acme", "api_requests", amount.clone(), "k1"))
            .await;
        for (what, reply) in [("check", &check), ("consume", &consumed), ("entries", &posted)] {
            assert_eq!(reply.status, 422, "{what} {amount}: {:?}", reply.body);
            assert_eq!(reply.body["error"]["details"]["errors"][0]["field"], "amount");
            assert_eq!(message(reply), format!("{wanted}{got}"), "{what} {amount}");
        }
    }
    // Review Y: metadata said only "must be a JSON object", whatever it got.
    for (metadata, got) in [
        (json!([1]), "an array"),
        (json!(true), "a boolean (true)"),
        (json!("s"), "a string"),
        (json!(5), "a number"),
    ] {
        let mut body = consume("acme", "api_requests", json!("1"), "k2");
        body["metadata"] = metadata.clone();
        for path in ["/v1/quota/consume", "/v1/entries"] {
            let reply = app.post(path, body.clone()).await;
            assert_eq!(reply.status, 422, "{path} {metadata}: {:?}", reply.body);
            assert_eq!(reply.body["error"]["details"]["errors"][0]["field"], "metadata");
            assert_eq!(
                message(&reply),
                format!("metadata must be a JSON object, such as {{\"region\": \"eu\"}}, or left out; got {got}"),
                "{path} {metadata}"
            );
        }
    }
    assert_eq!(app.count_entries().await, 0);
}

async fn a_reused_consume_key_names_each_field_that_differs_and_both_values(app: TestApp) {
    let at = days_ago_at(1, "10:00:00");
    let mut first = consume("acme", "api_requests", json!("3"), "k1");
    first["occurred_at"] = json!(at);
    let recorded = app.post("/v1/quota/consume", first.clone()).await;
    assert_eq!(recorded.status, 200, "{:?}", recorded.body);
    let id = recorded.body["entry_id"].as_i64().unwrap();

    let mut other_amount = first.clone();
    other_amount["amount"] = json!("4");
    let reply = app.post("/v1/quota/consume", other_amount).await;
    assert_eq!(
        (reply.status, reply.code()),
        (409, "idempotency_conflict"),
        "{:?}",
        reply.body
    );
    assert_eq!(
        message(&reply),
        format!(
            "idempotency_key 'k1' of account 'acme' was already used by entry {id}, which differs in amount (3 \
             there, 4 here); the same key must carry the same usage, so use a new key for new usage (a retry \
             resends the first content)"
        )
    );

    let mut two_fields = first.clone();
    two_fields["resource"] = json!("llm_tokens");
    two_fields["occurred_at"] = json!(days_ago_at(1, "11:30:00"));
    let reply = app.post("/v1/quota/consume", two_fields).await;
    assert_eq!(reply.status, 409, "{:?}", reply.body);
    let text = message(&reply);
    assert!(
        text.contains(&format!(
            "which differs in resource ('api_requests' there, 'llm_tokens' here) and occurred_at ({at} there, {} \
             here);",
            days_ago_at(1, "11:30:00")
        )),
        "{text}"
    );
    assert!(!text.contains("amount"), "{text}");
    assert!(!text.contains("reverse"), "{text}");
    // Without occurred_at, a retry matches whatever instant was recorded.
    let mut no_instant = first.clone();
    no_instant.as_object_mut().unwrap().remove("occurred_at");
    assert_eq!(app.post("/v1/quota/consume", no_instant).await.status, 200);
    assert_eq!(app.count_entries().await, 1);
}

async fn an_effective_at_or_expires_at_out_of_range_speaks_of_that_field(app: TestApp) {
    for (at, side) in [
        ("9999-12-31T00:00:00Z", "later"),
        ("9999-12-01T00:00:00Z", "later"),
        ("9999-12-31T23:00:00-05:00", "later"),
        ("0001-01-01T00:00:00+01:00", "earlier"),
    ] {
        let plan = app
            .put_admin("/v1/accounts/acme/plan", json!({"plan": "pro", "effective_at": at}))
            .await;
        assert_eq!(plan.status, 422, "{at}: {:?}", plan.body);
        assert_eq!(plan.body["error"]["details"]["errors"][0]["field"], "effective_at");
        let text = message(&plan);
        assert!(
            text.starts_with(&format!("effective_at {at:?} is {side} than Tally can record")),
            "{text}"
        );
        assert!(
            text.ends_with("or leave effective_at out to assign it from now"),
            "{text}"
        );

        let limit = app
            .put_admin(
                "/v1/accounts/acme/overrides/api_requests",
                json!({"limit": "5", "expires_at": at}),
            )
            .await;
        assert_eq!(limit.status, 422, "{at}: {:?}", limit.body);
        assert_eq!(limit.body["error"]["details"]["errors"][0]["field"], "expires_at");
        let text = message(&limit);
        assert!(
            text.starts_with(&format!("expires_at {at:?} is {side} than Tally can record")),
            "{text}"
        );
        assert!(text.contains("leave expires_at out"), "{text}");

        // The CLI twins speak of their flags, and change nothing either.
        let plan = app.cli(&["accounts", "set-plan", "acme", "pro", "--effective-at", at]);
        assert_eq!(plan.status.code(), Some(1));
        let text = String::from_utf8_lossy(&plan.stderr);
        assert!(
            text.contains(&format!("--effective-at {at:?} is {side} than Tally can record"))
                && text.contains("leave --effective-at out"),
            "{text}"
        );
        let limit = app.cli(&[
            "accounts",
            "override",
            "acme",
            "api_requests",
            "--limit",
            "5",
            "--expires-at",
            at,
        ]);
        assert_eq!(limit.status.code(), Some(1));
        let text = String::from_utf8_lossy(&limit.stderr);
        assert!(
            text.contains(&format!("--expires-at {at:?} is {side} than Tally can record"))
                && text.contains("leave --expires-at out"),
            "{text}"
        );
    }
    let account = app.get("/v1/accounts/acme").await;
    assert_eq!(account.body["plan_history"], json!([]), "{:?}", account.body);
    assert_eq!(account.body["overrides"], json!([]), "{:?}", account.body);
    // A text that is no instant at all names the flag too.
    let bad = app.cli(&["accounts", "set-plan", "acme", "pro", "--effective-at", "soon"]);
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("--effective-at: \"soon\" is not an RFC 3339 timestamp"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    // The last instant that fits is taken.
    let last = app
        .put_admin(
            "/v1/accounts/acme/overrides/api_requests",
            json!({"limit": "5", "expires_at": "9999-11-30T23:59:59Z"}),
        )
        .await;
    assert_eq!(last.status, 200, "{:?}", last.body);
}

/// Review AL: a back-dated `set-plan` said "is on plan free from …" while an
/// assignment taking effect later kept the account on pro.
async fn set_plan_says_the_plan_in_force_now_when_a_later_assignment_overtakes_it(app: TestApp) {
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();
    let pro = app.cli(&["accounts", "set-plan", "acme", "pro"]);
    assert!(pro.status.success(), "{}", stderr(&pro));
    assert!(
        stderr(&pro).contains("account acme is on plan pro from "),
        "{}",
        stderr(&pro)
    );
    let day_ago = (chrono::Utc::now() - chrono::Duration::days(1)).format("%Y-%m-%dT%H:%M:%SZ");
    let back = app.cli(&[
        "accounts",
        "set-plan",
        "acme",
        "free",
        "--effective-at",
        &day_ago.to_string(),
    ]);
    assert!(back.status.success(), "{}", stderr(&back));
    assert!(
        stderr(&back).contains(&format!(
            "account acme is on plan free from {day_ago}, but an assignment that takes effect later puts it on \
             pro now"
        )),
        "{}",
        stderr(&back)
    );
    let later = (chrono::Utc::now() + chrono::Duration::days(1)).format("%Y-%m-%dT%H:%M:%SZ");
    let ahead = app.cli(&[
        "accounts",
        "set-plan",
        "acme",
        "free",
        "--effective-at",
        &later.to_string(),
    ]);
    assert!(
        stderr(&ahead).contains(&format!(
            "account acme is on plan free from {later}; until then it is on pro"
        )),
        "{}",
        stderr(&ahead)
    );
    assert_eq!(app.get("/v1/accounts/acme").await.body["plan"], "pro");
}

async fn an_amount_of_zero_on_check_or_consume_says_what_to_do_instead(app: TestApp) {
    for zero in [json!("0"), json!(0), json!("0.00")] {
        let check = app
            .post(
                "/v1/quota/check",
                json!({"account": "acme", "resource": "agent_minutes", "amount": zero}),
            )
            .await;
        assert_eq!(check.status, 422, "{:?}", check.body);
        assert_eq!(
            message(&check),
            "amount 0 asks about no usage: a check's amount is the positive amount about to be used; leave \
             amount out to check one unit (the default)"
        );
        let consumed = app
            .post(
                "/v1/quota/consume",
                consume("acme", "agent_minutes", zero.clone(), "k1"),
            )
            .await;
        assert_eq!(consumed.status, 422, "{:?}", consumed.body);
        assert_eq!(
            message(&consumed),
            "amount 0 records no usage: a consume takes the positive amount used; to see what is left without \
             recording, POST /v1/quota/check; to free room, post a negative entry to /v1/entries"
        );
    }
    // Next to another problem, the zero is still explained.
    let both = app
        .post(
            "/v1/quota/consume",
            json!({"account": "acme", "resource": "api_requests", "amount": "0"}),
        )
        .await;
    let errors = both.body["error"]["details"]["errors"].as_array().unwrap().clone();
    let amount = errors.iter().find(|e| e["field"] == "amount").unwrap();
    assert!(
        amount["message"]
            .as_str()
            .unwrap()
            .starts_with("amount 0 records no usage")
    );
    assert_eq!(app.count_entries().await, 0);
}

/// An `occurred_at` out of bounds says what to send instead; a consume too
/// far back is not sent to the import's backfill, which checks no limit.
async fn an_occurred_at_out_of_bounds_says_what_to_send_instead_and_a_consume_is_not_told_to_backfill(app: TestApp) {
    let old = (chrono::Utc::now() - chrono::Duration::days(40)).to_rfc3339();
    let ahead = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let field_message = |reply: &crate::helpers::Reply| {
        reply.body["error"]["details"]["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let mut late_consume = consume("acme", "api_requests", json!("1"), "k-old");
    late_consume["occurred_at"] = json!(old);
    let refused = app.post("/v1/quota/consume", late_consume).await;
    assert_eq!(
        (refused.status, refused.code()),
        (422, "too_late"),
        "{:?}",
        refused.body
    );
    let said = field_message(&refused);
    assert!(
        said.contains(
            "is older than the late-arrival horizon of 35 days: a consume is judged in the window it is dated in"
        ) && said.contains("date it within the horizon or leave occurred_at out")
            && !said.contains("backfill it with"),
        "{said}"
    );
    let late_entry = app
        .post_entries(json!({"account": "acme", "resource": "api_requests", "amount": "1", "idempotency_key": "e-old", "occurred_at": old}))
        .await;
    assert!(
        field_message(&late_entry).ends_with("; backfill it with `tally import --allow-late`"),
        "{:?}",
        late_entry.body
    );
    let mut early_consume = consume("acme", "api_requests", json!("1"), "k-ahead");
    early_consume["occurred_at"] = json!(ahead);
    let early = app.post("/v1/quota/consume", early_consume).await;
    assert!(
        field_message(&early).contains("ahead of the server's clock")
            && field_message(&early).contains("or leave occurred_at out to record it at the server's time"),
        "{:?}",
        early.body
    );
    assert_eq!(app.count_entries().await, 0);
}

/// `tally check` judges its amount as `POST /v1/quota/check` does, in the
/// same words, and a precision error names the resource's digits on both.
async fn check_amounts_are_refused_alike_over_http_and_on_the_command_line(app: TestApp) {
    for (amount, says) in [
        (
            "0",
            "amount 0 asks about no usage: a check's amount is the positive amount about to be used; leave \
             amount out to check one unit (the default)",
        ),
        (
            "-3",
            "amount -3 must be positive: a check asks about usage about to happen; a correction or a deletion \
             is a negative entry (POST /v1/entries, or tally post)",
        ),
        (
            "1.255",
            "amount 1.255 has 3 significant fractional digits (trailing zeros aside); 'agent_minutes' takes 2",
        ),
    ] {
        let check = app
            .post(
                "/v1/quota/check",
                json!({"account": "acme", "resource": "agent_minutes", "amount": amount}),
            )
            .await;
        assert_eq!(
            (check.status, message(&check)),
            (422, says.to_owned()),
            "{:?}",
            check.body
        );
        let cli = app.cli(&["check", "acme", "agent_minutes", "--", amount]);
        assert_eq!(cli.status.code(), Some(2), "{cli:?}");
        assert_eq!(String::from_utf8_lossy(&cli.stderr).trim(), format!("error: {says}"));
    }
}

async fn a_path_that_is_not_utf_8_names_its_part_without_axum_text(app: TestApp) {
    for (method, path, part) in [
        ("GET", "/v1/accounts/%FF/usage", "account"),
        ("GET", "/v1/accounts/%FF", "account"),
        ("GET", "/v1/accounts/%FF/entries", "account"),
        ("GET", "/v1/accounts/%FF/timeseries?resource=api_requests", "account"),
        ("GET", "/v1/accounts/acme/features/%FF", "feature"),
        ("PUT", "/v1/accounts/acme/overrides/%FF", "resource"),
        ("POST", "/v1/entries/%FF/reversal", "id"),
    ] {
        let body = (method != "GET").then(|| json!({"idempotency_key": "k", "limit": "5"}).to_string());
        let reply = app.request(method, path, Some(&app.admin_key), body).await;
        assert_eq!(
            (reply.status, reply.code()),
            (422, "validation_failed"),
            "{method} {path}: {:?}",
            reply.body
        );
        assert_eq!(reply.body["error"]["details"]["errors"][0]["field"], "path");
        let text = message(&reply);
        assert!(
            text.starts_with(&format!(
                "the {part} in the path is not text: its percent-encoding (such as %FF) does not decode to UTF-8; "
            )),
            "{method} {path}: {text}"
        );
        assert!(!text.contains("Invalid URL"), "{text}");
    }
}

const SEAT_PLANS: &str = r#"
default_plan = "free"

[resources.api_requests]

[plans.free]
price = "0"

[plans.team]
price = "10"
features = { seats = 5, sso = true }

[plans.big]
price = "20"
features = { seats = 12, sso = true }
"#;

/// `seats` is a number wherever a plan declares it: on a plan without it
/// the answer is 0 and not allowed, never `false`, so a client reads one
/// type on every plan; a switch reads false (a catalog cannot give a
/// feature both types: `tally plans check` refuses it).
async fn a_numeric_feature_is_a_number_on_every_plan(app: TestApp) {
    let free = app.get("/v1/accounts/acme/features/seats").await;
    assert_eq!(
        free.body,
        json!({"feature": "seats", "allowed": false, "value": 0, "plan": "free"})
    );
    app.put_admin("/v1/accounts/acme/plan", json!({"plan": "team"})).await;
    let team = app.get("/v1/accounts/acme/features/seats").await;
    assert_eq!(
        team.body,
        json!({"feature": "seats", "allowed": true, "value": 5, "plan": "team"})
    );
    let cli = app.cli(&["feature", "other", "seats"]);
    assert_eq!(cli.status.code(), Some(1), "{}", String::from_utf8_lossy(&cli.stderr));
    assert_eq!(serde_json::from_slice::<Value>(&cli.stdout).unwrap(), free.body.clone());
    // sso is a switch: absent, it reads false.
    let sso = app.get("/v1/accounts/other/features/sso").await;
    assert_eq!(sso.body["value"], json!(false));
}
