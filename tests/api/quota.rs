//! Plans and quotas: exact checks, atomic consume with no overshoot, 429 with a
//! true Retry-After, rate limits, plan changes, overrides and features.

use std::sync::Arc;

use chrono::{Datelike, Duration, SecondsFormat, SubsecRound, Utc};
use serde_json::{Value, json};

use crate::both;
use crate::helpers::{
    Backend, Reply, ServeProcess, TestApp, assert_used_exact_while_posting_and_rolling_up, batch_at, days_ago_at,
    entry, entry_at, holding_the_consume_lock, until_a_backend_waits_on_a_lock, usage_row,
};

both!(
    a_scheduled_change_that_lets_a_refused_consume_through_sets_its_retry_after,
    a_new_default_plan_is_for_new_accounts_while_known_ones_keep_the_previous,
    sixty_four_concurrent_consumers_at_a_hard_limit_of_1000_land_exactly_1000,
    concurrent_consumes_over_several_limits_each_sent_twice_land_each_limit_and_answer_both_copies_alike,
    a_key_consumed_at_once_for_two_resources_records_one_and_refuses_the_other,
    a_key_consumed_and_posted_as_an_entry_at_once_is_recorded_once_and_both_answer_200,
    consumes_at_once_on_two_days_each_stop_at_their_own_day_limit,
    check_is_exact_at_any_instant_while_posting_and_rolling_up,
    a_day_limit_resets_at_midnight_utc,
    a_month_limit_resets_on_the_first_and_retry_after_counts_down_to_it,
    month_and_day_windows_end_right_on_leap_days_and_at_the_year_end,
    a_backdated_consume_is_told_the_true_wait_from_now_and_none_once_its_window_closed,
    a_total_limit_never_resets_and_deletions_free_room,
    a_plan_change_applies_from_its_effective_instant,
    a_consume_dated_before_a_downgrade_in_the_same_window_is_held_to_the_limit_in_force_now,
    a_dated_consume_held_by_the_limit_in_force_now_is_told_when_that_limit_lets_it_through,
    a_dated_consume_is_told_of_a_change_whose_limit_no_longer_holds_it,
    a_dated_consume_is_given_no_wait_that_would_take_it_past_the_late_horizon,
    a_dated_consume_past_a_soft_limit_in_force_now_warns_so_and_its_replay_too,
    an_override_beats_the_plan_until_it_expires,
    an_override_on_a_resource_dropped_from_the_catalog_can_still_be_removed,
    an_override_applies_from_when_it_is_set_not_to_earlier_instants,
    an_override_is_in_force_from_when_it_is_set_until_it_is_removed,
    an_override_that_would_expire_before_it_is_set_is_refused_and_changes_nothing,
    unlimited_never_rejects_and_soft_limits_record_and_warn,
    a_consume_that_would_take_an_unlimited_or_soft_total_past_64_bits_is_422_not_quota_exceeded,
    the_101st_request_in_a_minute_on_free_is_rate_limited_until_retry_after,
    a_rate_follows_the_plan_in_force_when_the_request_arrives_not_when_it_is_dated,
    a_consume_retried_with_its_key_returns_the_first_outcome,
    a_consume_with_the_key_of_a_posted_entry_records_nothing_and_answers_the_state_now_with_its_warnings,
    a_free_account_at_99999_requests_consumes_one_then_is_refused_until_upgraded,
    fifty_ai_generations_pass_on_free_and_the_51st_is_refused,
    usage_lists_every_limited_or_used_resource_with_warnings,
    features_follow_the_plan,
    bad_quota_and_account_input_is_refused_and_writes_nothing,
    the_cli_checks_and_reports_usage,
    a_cached_check_stays_exact_after_a_rollup_and_after_another_process_inserts,
    a_consume_replays_its_first_outcome_after_the_plan_changes,
    an_override_written_by_another_process_applies_to_the_next_consume_at_once,
    an_override_with_another_window_counts_over_that_window_in_check_and_consume,
    a_consume_recorded_on_a_plan_without_a_rate_replays_its_first_outcome_after_a_downgrade_to_one,
    a_limit_lowered_while_a_consume_waits_for_the_lock_applies_to_it,
    usage_recorded_while_a_consume_waits_for_the_lock_counts_against_it,
    plans_missing_from_the_catalog_count_the_accounts_on_them_now_or_later,
    a_stored_outcome_that_cannot_be_read_back_is_a_500_not_a_validation_error,
);

fn iso(t: chrono::DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

async fn consume(app: &TestApp, account: &str, resource: &str, amount: &str, key: &str, at: Option<&str>) -> Reply {
    let mut body = json!({"account": account, "resource": resource, "amount": amount, "idempotency_key": key});
    if let Some(at) = at {
        body["occurred_at"] = json!(at);
    }
    app.post("/v1/quota/consume", body).await
}

async fn check(app: &TestApp, account: &str, resource: &str, amount: &str, at: Option<&str>) -> Value {
    let mut body = json!({"account": account, "resource": resource, "amount": amount});
    if let Some(at) = at {
        body["at"] = json!(at);
    }
    let reply = app.post("/v1/quota/check", body).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    reply.body
}

fn retry_after(reply: &Reply) -> Option<u64> {
    reply
        .headers
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap())
}

async fn sixty_four_concurrent_consumers_at_a_hard_limit_of_1000_land_exactly_1000(app: TestApp) {
    sixty_four_consumers_of_ai_generations_land_exactly_1000(app).await;
}

/// `ai_generations` with a per-minute rate far above what the test sends: a
/// rate-limited consume is decided in Rust between the store's statements
/// (`Store::consume`), not in the grouped call, so its no-overshoot rests on
/// the per-(account, resource) lock alone.
const RATED_AI_GENERATIONS: &str = r#"
default_plan = "free"

[resources.ai_generations]
decimals = 0

[plans.free]
price = "0"

[plans.free.limits.ai_generations]
window = "month"
limit = "50"
enforcement = "hard"
rate_per_minute = 1000000
"#;

/// The same 64 consumers on a rate-limited resource: the path that decides
/// each consume in Rust, with the rate limiter's own state beside it.
async fn sixty_four_concurrent_rate_limited_consumers_at_a_hard_limit_of_1000_land_exactly_1000(app: TestApp) {
    sixty_four_consumers_of_ai_generations_land_exactly_1000(app).await;
}
both!(plans = RATED_AI_GENERATIONS; sixty_four_concurrent_rate_limited_consumers_at_a_hard_limit_of_1000_land_exactly_1000);

/// 64 workers send 1 500 consumes of 1 `ai_generations` for `hot` (limit
/// 1 000 by override) while rollups run: exactly 1 000 pass, 500 are 429.
async fn sixty_four_consumers_of_ai_generations_land_exactly_1000(app: TestApp) {
    let set = app
        .put_admin(
            "/v1/accounts/hot/overrides/ai_generations",
            json!({"limit": "1000", "enforcement": "hard"}),
        )
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    let app = Arc::new(app);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let roller = {
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            // When each run ended and what it folded.
            let mut runs = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let report = app
                    .rollup_with(tally::jobs::rollup::RollupOptions {
                        batch_size: 50,
                        failpoint: None,
                        max_batch_size: None,
                    })
                    .await
                    .unwrap();
                runs.push((std::time::Instant::now(), report.entries));
            }
            runs
        })
    };
    let mut workers = Vec::new();
    for worker in 0..64 {
        let app = app.clone();
        workers.push(tokio::spawn(async move {
            let (mut ok, mut refused) = (0, 0);
            for attempt in (worker..1500).step_by(64) {
                let reply = consume(&app, "hot", "ai_generations", "1", &format!("c{attempt}"), None).await;
                match reply.status {
                    200 => ok += 1,
                    429 => {
                        assert_eq!(reply.code(), "quota_exceeded");
                        refused += 1
                    }
                    other => panic!("unexpected {other}: {:?}", reply.body),
                }
            }
            (ok, refused)
        }));
    }
    let (mut ok, mut refused) = (0, 0);
    for w in workers {
        let (o, r) = w.await.unwrap();
        ok += o;
        refused += r;
    }
    let consumed = std::time::Instant::now();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let runs = roller.await.unwrap();
    assert_eq!((ok, refused), (1000, 500));
    assert_eq!(app.ledger_sum("hot", "ai_generations").await, 1000);
    // The rollups did fold consumes while others were still being decided.
    let folded_meanwhile: u64 = runs.iter().filter(|(end, _)| *end < consumed).map(|(_, n)| n).sum();
    assert!(
        folded_meanwhile > 0,
        "no rollup folded anything during the consumes: {runs:?}"
    );
    let after = check(&app, "hot", "ai_generations", "1", None).await;
    assert_eq!(after["used"], "1000");
    assert_eq!(after["allowed"], false);
}

/// Many consumes at once over three (account, resource) limits, every key
/// sent twice at the same moment: on PostgreSQL the waiting consumes are
/// decided in groups (one call, one `used` read per pair), so this checks a
/// group's running `used` and a key's second copy replayed within a group.
async fn concurrent_consumes_over_several_limits_each_sent_twice_land_each_limit_and_answer_both_copies_alike(
    app: TestApp,
) {
    let limits = [
        ("a", "ai_generations", 30),
        ("b", "ai_generations", 20),
        ("a", "llm_tokens", 25),
    ];
    for (account, resource, limit) in limits {
        let set = app
            .put_admin(
                &format!("/v1/accounts/{account}/overrides/{resource}"),
                json!({"limit": limit.to_string(), "enforcement": "hard"}),
            )
            .await;
        assert_eq!(set.status, 200, "{:?}", set.body);
    }
    let app = Arc::new(app);
    let keys_per_pair = 40;
    let mut sent = Vec::new();
    for (pair, (account, resource, _)) in limits.into_iter().enumerate() {
        for i in 0..keys_per_pair {
            for _copy in 0..2 {
                let app = app.clone();
                let key = format!("p{pair}-{i}");
                sent.push(tokio::spawn(async move {
                    let reply = consume(&app, account, resource, "1", &key, None).await;
                    (pair, key, reply)
                }));
            }
        }
    }
    let mut by_key: std::collections::BTreeMap<(usize, String), Vec<Reply>> = Default::default();
    for task in sent {
        let (pair, key, reply) = task.await.unwrap();
        by_key.entry((pair, key)).or_default().push(reply);
    }
    let mut used_after: Vec<Vec<i64>> = vec![Vec::new(); limits.len()];
    for ((pair, key), replies) in &by_key {
        let [one, two] = &replies[..] else {
            panic!("{key}: {} replies", replies.len())
        };
        assert_eq!(one.status, two.status, "{key}: {:?} / {:?}", one.body, two.body);
        match one.status {
            200 => {
                assert_eq!(
                    one.body["entry_id"], two.body["entry_id"],
                    "{key}: one entry for both copies"
                );
                used_after[*pair].push(one.body["used"].as_str().unwrap().parse().unwrap());
            }
            429 => assert_eq!((one.code(), two.code()), ("quota_exceeded", "quota_exceeded")),
            other => panic!("{key}: unexpected {other}: {:?}", one.body),
        }
    }
    for (pair, (account, resource, limit)) in limits.into_iter().enumerate() {
        let mut seen = std::mem::take(&mut used_after[pair]);
        seen.sort_unstable();
        assert_eq!(
            seen,
            (1..=limit).collect::<Vec<i64>>(),
            "{account}/{resource}: each recorded consume saw the ones before it"
        );
        assert_eq!(app.ledger_sum(account, resource).await, limit, "{account}/{resource}");
    }
}

/// Each key is sent at the same moment for two resources: whichever comes
/// first is recorded, the other is an idempotency conflict (409), never a
/// second row — also when the two meet inside one PostgreSQL group or in two
/// groups at once (the group then falls back to deciding each alone).
async fn a_key_consumed_at_once_for_two_resources_records_one_and_refuses_the_other(app: TestApp) {
    let app = Arc::new(app);
    let mut sent = Vec::new();
    for i in 0..30 {
        for resource in ["ai_generations", "llm_tokens"] {
            let app = app.clone();
            sent.push(tokio::spawn(async move {
                let key = format!("k{i}");
                let reply = consume(&app, "acme", resource, "1", &key, None).await;
                (key, reply)
            }));
        }
    }
    let mut statuses: std::collections::BTreeMap<String, Vec<u16>> = Default::default();
    for task in sent {
        let (key, reply) = task.await.unwrap();
        if reply.status == 409 {
            assert_eq!(reply.code(), "idempotency_conflict", "{:?}", reply.body);
        }
        statuses.entry(key).or_default().push(reply.status);
    }
    for (key, mut got) in statuses {
        got.sort_unstable();
        assert_eq!(got, [200, 409], "{key}");
    }
    assert_eq!(app.count_entries().await, 30);
}

/// Each key is consumed and posted as an entry of the same content at the
/// same moment (posting takes no consume lock): one row, and both are told
/// 200 — the consume that comes second answers as a replay, as after a posted
/// entry (review AJ: PostgreSQL answered 409 when the insert met the key).
/// Both consume paths: `api_requests` has a rate on free (the
/// per-resource path), `ai_generations` none (PostgreSQL's groups).
async fn a_key_consumed_and_posted_as_an_entry_at_once_is_recorded_once_and_both_answer_200(app: TestApp) {
    let app = Arc::new(app);
    let mut sent = Vec::new();
    for i in 0..200 {
        let resource = ["api_requests", "ai_generations"][i % 2];
        // An account each: none nears its limit or its rate.
        let (account, key) = (format!("a{i}"), format!("k{i}"));
        let (posting, consuming) = (app.clone(), app.clone());
        let body = entry(&account, resource, "1", &key);
        sent.push(tokio::spawn(async move {
            let (posted, consumed) = tokio::join!(
                posting.post_entries(body),
                consume(&consuming, &account, resource, "1", &key, None)
            );
            (key, posted, consumed)
        }));
    }
    for task in sent {
        let (key, posted, consumed) = task.await.unwrap();
        assert_eq!(posted.status, 200, "{key}: {:?}", posted.body);
        assert_eq!(consumed.status, 200, "{key}: {:?}", consumed.body);
        assert_eq!(
            consumed.body["entry_id"], posted.body["entries"][0]["id"],
            "{key}: one row, named alike by both"
        );
    }
    assert_eq!(app.count_entries().await, 200);
}

/// Consumes of one (account, resource) dated on two days, sent at once and
/// interleaved: each day's limit lands exactly. On PostgreSQL such consumes can
/// meet in one group, whose `used` must then be kept per day (a group that
/// re-read a day's `used` after the other day's would miss its own consumes
/// of that day and overshoot).
async fn consumes_at_once_on_two_days_each_stop_at_their_own_day_limit(app: TestApp) {
    let limit = 10;
    // Now and 24 h before are always on two UTC days.
    let now = Utc::now();
    let set = app
        .put_override_since(
            "acme",
            "llm_tokens",
            json!({"limit": limit.to_string(), "enforcement": "hard"}),
            now - Duration::days(2),
        )
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    let days = [iso(now - Duration::days(1)), iso(now)];
    let app = Arc::new(app);
    let mut sent = Vec::new();
    for i in 0..80 {
        let (app, at) = (app.clone(), days[i % 2].clone());
        sent.push(tokio::spawn(async move {
            consume(&app, "acme", "llm_tokens", "1", &format!("k{i}"), Some(&at)).await
        }));
    }
    let mut recorded = 0;
    for task in sent {
        let reply = task.await.unwrap();
        match reply.status {
            200 => recorded += 1,
            429 => assert_eq!(reply.code(), "quota_exceeded", "{:?}", reply.body),
            other => panic!("unexpected {other}: {:?}", reply.body),
        }
    }
    assert_eq!(recorded, 2 * limit, "each day records exactly its limit");
    for at in &days {
        let body = check(&app, "acme", "llm_tokens", "1", Some(at)).await;
        assert_eq!(body["used"], limit.to_string(), "used on the day of {at}");
    }
    assert_eq!(app.ledger_sum("acme", "llm_tokens").await, 2 * limit);
}

/// Issue 4's property: `check`'s `used` equals a plain SUM over the ledger at
/// any instant while entries are posted and rolled up.
async fn check_is_exact_at_any_instant_while_posting_and_rolling_up(app: TestApp) {
    // One pinned instant: a run crossing midnight keeps one day window.
    let at = days_ago_at(1, "12:00:00");
    assert_used_exact_while_posting_and_rolling_up(Arc::new(app), "llm_tokens", at.clone(), |app| {
        let at = at.clone();
        async move {
            check(&app, "acme", "llm_tokens", "1", Some(&at)).await["used"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap()
        }
    })
    .await;
}

async fn a_day_limit_resets_at_midnight_utc(app: TestApp) {
    // free: llm_tokens 1 000 per UTC day, hard.
    let today = Utc::now().date_naive();
    let last_second = iso(today.and_hms_opt(0, 0, 0).unwrap().and_utc() - Duration::milliseconds(1));
    let midnight = iso(today.and_hms_opt(0, 0, 0).unwrap().and_utc());
    // Now is that last millisecond: Retry-After counts from now.
    app.clock
        .freeze_at(today.and_hms_opt(0, 0, 0).unwrap().and_utc() - Duration::milliseconds(1));
    assert_eq!(
        consume(&app, "acme", "llm_tokens", "1000", "a", Some(&last_second))
            .await
            .status,
        200
    );
    let refused = consume(&app, "acme", "llm_tokens", "1", "b", Some(&last_second)).await;
    assert_eq!(refused.status, 429);
    assert_eq!(retry_after(&refused), Some(1), "1 ms before midnight rounds up to 1 s");
    let next_day = consume(&app, "acme", "llm_tokens", "1", "c", Some(&midnight)).await;
    assert_eq!(next_day.status, 200, "{:?}", next_day.body);
    assert_eq!(next_day.body["used"], "1");
    assert_eq!(next_day.body["period_start"], format!("{today}T00:00:00Z"));
}

async fn a_month_limit_resets_on_the_first_and_retry_after_counts_down_to_it(app: TestApp) {
    // free: ai_generations 50 per UTC month, hard. 23:59:30 on the last day of last month.
    let first = Utc::now().date_naive().with_day(1).unwrap();
    let first_instant = first.and_hms_opt(0, 0, 0).unwrap().and_utc();
    let late = iso(first_instant - Duration::seconds(30));
    // Now is 23:59:30 on that last day: Retry-After counts from now.
    app.clock.freeze_at(first_instant - Duration::seconds(30));
    assert_eq!(
        consume(&app, "acme", "ai_generations", "50", "a", Some(&late))
            .await
            .status,
        200
    );
    let refused = consume(&app, "acme", "ai_generations", "1", "b", Some(&late)).await;
    assert_eq!(refused.status, 429, "{:?}", refused.body);
    assert_eq!(refused.code(), "quota_exceeded");
    assert_eq!(retry_after(&refused), Some(30));
    assert_eq!(refused.body["error"]["details"]["used"], "50");
    assert_eq!(refused.body["error"]["details"]["limit"], "50");
    assert_eq!(
        refused.body["error"]["details"]["period_end"],
        format!("{first}T00:00:00Z")
    );
    let new_month = consume(&app, "acme", "ai_generations", "1", "c", Some(&iso(first_instant))).await;
    assert_eq!(new_month.status, 200, "{:?}", new_month.body);
    assert_eq!(app.ledger_sum("acme", "ai_generations").await, 51);
}

/// The same at fixed month ends whatever day the tests run: a leap day, an
/// ordinary February's end and a year's end (the test above meets each only
/// in the month after it).
async fn month_and_day_windows_end_right_on_leap_days_and_at_the_year_end(app: TestApp) {
    for (last_day, next_first) in [
        ("2028-02-29", "2028-03-01"),
        ("2027-02-28", "2027-03-01"),
        ("2026-12-31", "2027-01-01"),
    ] {
        let late: chrono::DateTime<Utc> = format!("{last_day}T23:59:30Z").parse().unwrap();
        app.clock.freeze_at(late);
        let account = format!("acct-{last_day}");
        let month_full = consume(&app, &account, "ai_generations", "50", "m", Some(&iso(late))).await;
        assert_eq!(month_full.status, 200, "{last_day}: {:?}", month_full.body);
        assert_eq!(
            month_full.body["period_start"],
            format!("{}-01T00:00:00Z", &last_day[..7]),
            "{last_day}"
        );
        let day_full = consume(&app, &account, "llm_tokens", "1000", "d", Some(&iso(late))).await;
        assert_eq!(day_full.status, 200, "{last_day}: {:?}", day_full.body);
        for resource in ["ai_generations", "llm_tokens"] {
            let refused = consume(
                &app,
                &account,
                resource,
                "1",
                &format!("{resource}-more"),
                Some(&iso(late)),
            )
            .await;
            assert_eq!(refused.status, 429, "{last_day} {resource}: {:?}", refused.body);
            assert_eq!(retry_after(&refused), Some(30), "{last_day} {resource}");
            assert_eq!(
                refused.body["error"]["details"]["period_end"],
                format!("{next_first}T00:00:00Z"),
                "{last_day} {resource}"
            );
        }
        let next: chrono::DateTime<Utc> = format!("{next_first}T00:00:00Z").parse().unwrap();
        app.clock.freeze_at(next);
        for resource in ["ai_generations", "llm_tokens"] {
            let fresh = consume(
                &app,
                &account,
                resource,
                "1",
                &format!("{resource}-next"),
                Some(&iso(next)),
            )
            .await;
            assert_eq!(fresh.status, 200, "{next_first} {resource}: {:?}", fresh.body);
            assert_eq!(fresh.body["used"], "1", "{next_first} {resource}");
        }
    }
    app.clock.thaw();
}

/// A refused consume that a scheduled change lets through (an override that
/// expires, a plan that takes effect) is told to come back then, not when
/// its window ends weeks later; one dated by the caller, or that the change
/// does not help, still waits for the window.
async fn a_scheduled_change_that_lets_a_refused_consume_through_sets_its_retry_after(app: TestApp) {
    let now = Utc::now().date_naive().and_hms_opt(12, 0, 0).unwrap().and_utc();
    app.clock.freeze_at(now);
    let month_end = (now.date_naive().with_day(1).unwrap() + chrono::Months::new(1))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let to_month_end = u64::try_from((month_end - now).num_seconds()).unwrap();

    // free ai_generations: 50 a month; an override of 2 that expires in 8 s.
    let set = app
        .put_admin(
            "/v1/accounts/oy/overrides/ai_generations",
            json!({"limit": "2", "expires_at": iso(now + Duration::seconds(8))}),
        )
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    assert_eq!(
        consume(&app, "oy", "ai_generations", "2", "oy-1", None).await.status,
        200
    );
    let refused = consume(&app, "oy", "ai_generations", "1", "oy-2", None).await;
    assert_eq!(
        (refused.status, retry_after(&refused)),
        (429, Some(8)),
        "{:?}",
        refused.body
    );
    let message = refused.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("the override of account 'oy' for ai_generations expires at")
            && message.contains("(in 8 s), and then it passes (month limit 50)"),
        "{message}"
    );
    // More than the override's whole limit: no fresh window takes it, the expiry does.
    let whole = consume(&app, "oy", "ai_generations", "3", "oy-3", None).await;
    assert_eq!((whole.status, retry_after(&whole)), (429, Some(8)), "{:?}", whole.body);
    // Dated by the caller: the limit at that instant does not change by waiting.
    let dated = consume(&app, "oy", "ai_generations", "1", "oy-4", Some(&iso(now))).await;
    assert_eq!(
        (dated.status, retry_after(&dated)),
        (429, Some(to_month_end)),
        "{:?}",
        dated.body
    );
    app.clock.freeze_at(now + Duration::seconds(8));
    assert_eq!(
        consume(&app, "oy", "ai_generations", "1", "oy-2", None).await.status,
        200
    );

    // A plan that takes effect in 10 s; one that would not help is passed over.
    app.clock.freeze_at(now);
    assert_eq!(
        consume(&app, "up", "ai_generations", "50", "up-1", None).await.status,
        200
    );
    for (plan, seconds) in [("free", 5), ("pro", 10)] {
        let scheduled = app
            .put_admin(
                "/v1/accounts/up/plan",
                json!({"plan": plan, "effective_at": iso(now + Duration::seconds(seconds))}),
            )
            .await;
        assert_eq!(scheduled.status, 200, "{:?}", scheduled.body);
    }
    let refused = consume(&app, "up", "ai_generations", "1", "up-2", None).await;
    assert_eq!(
        (refused.status, retry_after(&refused)),
        (429, Some(10)),
        "{:?}",
        refused.body
    );
    let message = refused.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("account 'up' moves to plan 'pro' at")
            && message.contains("(in 10 s), and then it passes (unlimited)"),
        "{message}"
    );
    // Nothing scheduled: the window's end, as before.
    assert_eq!(
        consume(&app, "flat", "ai_generations", "50", "flat-1", None)
            .await
            .status,
        200
    );
    let flat = consume(&app, "flat", "ai_generations", "1", "flat-2", None).await;
    assert_eq!(
        (flat.status, retry_after(&flat)),
        (429, Some(to_month_end)),
        "{:?}",
        flat.body
    );

    // More than the whole limit: no fresh window takes it, but a plan from
    // the next month does (looked for past the window's end).
    let edge = app
        .put_admin(
            "/v1/accounts/edge/plan",
            json!({"plan": "pro", "effective_at": iso(month_end)}),
        )
        .await;
    assert_eq!(edge.status, 200, "{:?}", edge.body);
    let whole = consume(&app, "edge", "ai_generations", "51", "edge-1", None).await;
    assert_eq!(
        (whole.status, retry_after(&whole)),
        (429, Some(to_month_end)),
        "{:?}",
        whole.body
    );
    assert!(
        whole.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("account 'edge' moves to plan 'pro' at"),
        "{:?}",
        whole.body
    );
    // A full window whose end is also when a plan takes effect: the wait is
    // the same, and the message names the plan (the end is included).
    assert_eq!(
        consume(&app, "edge", "ai_generations", "50", "edge-2", None)
            .await
            .status,
        200
    );
    let full = consume(&app, "edge", "ai_generations", "1", "edge-3", None).await;
    assert_eq!(
        (full.status, retry_after(&full)),
        (429, Some(to_month_end)),
        "{:?}",
        full.body
    );
    assert!(
        full.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("account 'edge' moves to plan 'pro' at"),
        "{:?}",
        full.body
    );
    // Review AR. A change within the window that is too small for what is
    // used now: the fresh window after it takes the amount (it used to be
    // told "no later window takes it", with no Retry-After).
    let set = app
        .put_admin(
            "/v1/accounts/ex/overrides/llm_tokens",
            json!({"limit": "5", "expires_at": iso(now + Duration::seconds(60))}),
        )
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    assert_eq!(consume(&app, "ex", "llm_tokens", "4", "ex-1", None).await.status, 200);
    let tomorrow = (now.date_naive() + Duration::days(1))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let to_tomorrow = u64::try_from((tomorrow - now).num_seconds()).unwrap();
    let later = consume(&app, "ex", "llm_tokens", "997", "ex-2", None).await;
    assert_eq!(
        (later.status, retry_after(&later)),
        (429, Some(to_tomorrow)),
        "{:?}",
        later.body
    );
    let message = later.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "with the changes scheduled for account 'ex', it passes from {} (in {to_tomorrow} s): day limit 1000 on \
             plan 'free', 0 used then",
            tomorrow.to_rfc3339_opts(SecondsFormat::Secs, true)
        )),
        "{message}"
    );
    // A plan that does not include the resource, moving to one too small
    // for what is used: the next month on the new plan takes it.
    let moved = app
        .put_admin(
            "/v1/accounts/px/plan",
            json!({"plan": "pro", "effective_at": iso(now + Duration::seconds(30))}),
        )
        .await;
    assert_eq!(moved.status, 200, "{:?}", moved.body);
    assert_eq!(
        app.post_entries(entry_at("px", "agent_minutes", "50", "px-0", &iso(now)))
            .await
            .status,
        200
    );
    let next_month = consume(&app, "px", "agent_minutes", "20", "px-1", None).await;
    assert_eq!(
        (next_month.status, retry_after(&next_month)),
        (429, Some(to_month_end)),
        "{:?}",
        next_month.body
    );
    assert!(
        next_month.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("month limit 60 on plan 'pro', 0 used then"),
        "{:?}",
        next_month.body
    );
    // A downgrade at the window's end to a plan without the resource: the
    // window's end does not help, so there is no Retry-After.
    for (plan, at) in [("pro", now - Duration::days(1)), ("free", month_end)] {
        let assigned = app
            .put_admin("/v1/accounts/dg/plan", json!({"plan": plan, "effective_at": iso(at)}))
            .await;
        assert_eq!(assigned.status, 200, "{:?}", assigned.body);
    }
    assert_eq!(
        app.post_entries(entry_at("dg", "agent_minutes", "60", "dg-0", &iso(now)))
            .await
            .status,
        200
    );
    let never = consume(&app, "dg", "agent_minutes", "1", "dg-1", None).await;
    assert_eq!((never.status, retry_after(&never)), (429, None), "{:?}", never.body);
    assert!(
        never.body["error"]["message"].as_str().unwrap().contains(
            "changes are scheduled for account 'dg', but neither this window's end nor the windows after them take it"
        ),
        "{:?}",
        never.body
    );
    // Review AT: a downgrade now, an upgrade in the middle of a later
    // window: the upgrade itself is when it passes, not that window's end.
    let mid_next_month = month_end + Duration::days(14) + Duration::hours(12);
    for (plan, at) in [
        ("pro", now - Duration::days(1)),
        ("free", now + Duration::seconds(5)),
        ("scale", mid_next_month),
    ] {
        let assigned = app
            .put_admin("/v1/accounts/mid/plan", json!({"plan": plan, "effective_at": iso(at)}))
            .await;
        assert_eq!(assigned.status, 200, "{:?}", assigned.body);
    }
    assert_eq!(
        app.post_entries(entry_at("mid", "agent_minutes", "60", "mid-0", &iso(now)))
            .await
            .status,
        200
    );
    let upgrade = consume(&app, "mid", "agent_minutes", "10", "mid-1", None).await;
    let to_upgrade = u64::try_from((mid_next_month - now).num_seconds()).unwrap();
    assert_eq!(
        (upgrade.status, retry_after(&upgrade)),
        (429, Some(to_upgrade)),
        "{:?}",
        upgrade.body
    );
    // A total never gets a Retry-After (the contract), scheduled change or not.
    let gib = 1_u64 << 30;
    let roomy = app
        .put_admin(
            "/v1/accounts/disk/plan",
            json!({"plan": "pro", "effective_at": iso(now + Duration::seconds(10))}),
        )
        .await;
    assert_eq!(roomy.status, 200, "{:?}", roomy.body);
    let disk = consume(&app, "disk", "storage_bytes", &(26 * gib).to_string(), "disk-1", None).await;
    assert_eq!((disk.status, retry_after(&disk)), (429, None), "{:?}", disk.body);
    app.clock.thaw();
}

/// Retry-After is a wait from now: a consume dated 10:00 and refused at
/// 12:00 waits 12 h for midnight, not 14; one dated in a window that has
/// closed gets none (it stays in that window however long it waits).
async fn a_backdated_consume_is_told_the_true_wait_from_now_and_none_once_its_window_closed(app: TestApp) {
    // free: llm_tokens 1 000 per UTC day, hard.
    let today = Utc::now().date_naive();
    let at = |day: chrono::NaiveDate, hour: u32| day.and_hms_opt(hour, 0, 0).unwrap().and_utc();
    app.clock.freeze_at(at(today, 12));
    let yesterday = today.pred_opt().unwrap();
    for (day, tag) in [(today, "today"), (yesterday, "yesterday")] {
        let full = consume(
            &app,
            "acme",
            "llm_tokens",
            "1000",
            &format!("{tag}-full"),
            Some(&iso(at(day, 10))),
        )
        .await;
        assert_eq!(full.status, 200, "{:?}", full.body);
    }
    let refused = consume(&app, "acme", "llm_tokens", "1", "today-more", Some(&iso(at(today, 10)))).await;
    assert_eq!(refused.status, 429, "{:?}", refused.body);
    assert_eq!(
        retry_after(&refused),
        Some(12 * 3600),
        "from 12:00 (now), not from 10:00"
    );
    // Dated 3 minutes ahead: the window still ends at midnight, 12 h away.
    let ahead = iso(at(today, 12) + Duration::minutes(3));
    let refused_ahead = consume(&app, "acme", "llm_tokens", "1", "today-ahead", Some(&ahead)).await;
    assert_eq!(refused_ahead.status, 429, "{:?}", refused_ahead.body);
    assert_eq!(
        retry_after(&refused_ahead),
        Some(12 * 3600),
        "from now, not from occurred_at"
    );
    let closed = consume(
        &app,
        "acme",
        "llm_tokens",
        "1",
        "yesterday-more",
        Some(&iso(at(yesterday, 10))),
    )
    .await;
    assert_eq!(closed.status, 429, "{:?}", closed.body);
    assert_eq!(closed.code(), "quota_exceeded");
    assert_eq!(retry_after(&closed), None, "{:?}", closed.headers);
    let message = closed.body["error"]["message"].as_str().unwrap();
    assert!(message.contains(&format!("closed at {today}T00:00:00Z")), "{message}");
    assert_eq!(app.ledger_sum("acme", "llm_tokens").await, 2000);
}

async fn a_total_limit_never_resets_and_deletions_free_room(app: TestApp) {
    // free: storage_bytes 25 GiB in total, hard.
    let gib = 1_073_741_824i64;
    app.post_entries(entry("acme", "storage_bytes", &(25 * gib).to_string(), "fill"))
        .await;
    let refused = consume(&app, "acme", "storage_bytes", "1", "more", None).await;
    assert_eq!(refused.status, 429);
    assert_eq!(retry_after(&refused), None, "a total window never resets");
    assert_eq!(refused.body["error"]["details"]["period_end"], Value::Null);
    app.rollup().await;
    // Months and a year later, the balance still stands.
    let next_year = iso(Utc::now() + Duration::days(400));
    let later = check(&app, "acme", "storage_bytes", "1", Some(&next_year)).await;
    assert_eq!(
        (later["used"].clone(), later["allowed"].clone()),
        (json!((25 * gib).to_string()), json!(false))
    );
    app.post_entries(entry("acme", "storage_bytes", &(-gib).to_string(), "delete"))
        .await;
    let room = consume(&app, "acme", "storage_bytes", &gib.to_string(), "again", None).await;
    assert_eq!(room.status, 200, "{:?}", room.body);
    assert_eq!(room.body["used"], (25 * gib).to_string());
}

/// A catalog's new `default_plan` is for new accounts: the accounts already
/// known on the default keep the previous one, their past months (invoices)
/// and their future, recorded once in their plan history when `serve`
/// starts with it; any other command (`migrate` too) only warns, and a
/// default no longer in the catalog is said.
async fn a_new_default_plan_is_for_new_accounts_while_known_ones_keep_the_previous(app: TestApp) {
    assert_eq!(
        consume(&app, "acme", "ai_generations", "50", "a", None).await.status,
        200
    );
    let later = iso(Utc::now() + Duration::days(40));
    let scheduled = app
        .put_admin(
            "/v1/accounts/sched/plan",
            json!({"plan": "scale", "effective_at": later}),
        )
        .await;
    assert_eq!(scheduled.status, 200, "{:?}", scheduled.body);
    let dir = tempfile::tempdir().unwrap();
    let builtin = include_str!("../../src/domain/builtin_catalog.toml");
    let catalog = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let pro_default = catalog(
        "pro-default.toml",
        builtin.replace(r#"default_plan = "free""#, r#"default_plan = "pro""#),
    );
    // The JSON a command printed (`check` exits 1 for "not allowed").
    let json = |output: &std::process::Output| -> Value {
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)))
    };
    let stderr = |output: &std::process::Output| String::from_utf8_lossy(&output.stderr).into_owned();
    // `tally serve` with the catalog `plans` until it listens; its log.
    let serve_with = async |plans: &std::path::Path| {
        let mut serve = ServeProcess::start(
            &app.database_url,
            &["--no-jobs"],
            &[("TALLY_PLANS", plans.to_str().unwrap()), ("TALLY_ADMIN_KEY", "k")],
        )
        .await;
        serve.stop().await;
        serve.stderr()
    };

    // A command run with another catalog than the server's, `migrate`
    // included, warns and writes nothing.
    for command in [&["accounts", "show", "acme"][..], &["migrate"]] {
        let by_hand = app.cli_with_plans(&pro_default, command);
        assert!(
            by_hand.status.success()
                && stderr(&by_hand).contains("this catalog's default_plan is 'pro', but the database's is 'free'"),
            "{command:?}: {}",
            stderr(&by_hand)
        );
    }
    assert_eq!(json(&app.cli(&["accounts", "show", "acme"]))["plan_history"], json!([]));

    // `serve` with the new catalog records the change.
    let said = serve_with(&pro_default).await;
    assert!(
        said.contains("default_plan changed from 'free' to 'pro'")
            && said.contains("the 2 account(s) known now keep 'free' wherever they have no plan of their own"),
        "{said}"
    );
    let acme = json(&app.cli_with_plans(&pro_default, &["accounts", "show", "acme"]));
    assert_eq!(acme["plan"], "free");
    assert_eq!(
        acme["plan_history"],
        json!([{"plan": "free", "effective_at": "0001-01-01T00:00:00Z", "created_at": acme["plan_history"][0]["created_at"]}])
    );
    let full = json(&app.cli_with_plans(&pro_default, &["check", "acme", "ai_generations"]));
    assert_eq!(
        (full["plan"].as_str(), full["allowed"].as_bool()),
        (Some("free"), Some(false))
    );
    let sched = json(&app.cli_with_plans(&pro_default, &["check", "sched", "ai_generations"]));
    assert_eq!(sched["plan"], "free", "on the default until its own change");
    let newco = json(&app.cli_with_plans(&pro_default, &["check", "newco", "ai_generations"]));
    assert_eq!(newco["plan"], "pro");
    let month = &iso(Utc::now())[..7];
    let invoice = app.cli_with_plans(
        &pro_default,
        &["export", "invoice", "--period", month, "--account", "acme"],
    );
    assert!(
        String::from_utf8_lossy(&invoice.stdout).contains("acme,free,plan,"),
        "{}",
        String::from_utf8_lossy(&invoice.stdout)
    );
    // Kept on the former default, an account is billed as the default's
    // are: not in a month without usage (the month before, here).
    let last_month = (Utc::now().date_naive().with_day(1).unwrap() - Duration::days(1))
        .format("%Y-%m")
        .to_string();
    let before = app.cli_with_plans(&pro_default, &["export", "invoice", "--period", &last_month]);
    assert_eq!(
        String::from_utf8_lossy(&before.stdout).lines().count(),
        1,
        "only the header: {}",
        String::from_utf8_lossy(&before.stdout)
    );

    // The same catalog again: nothing more is assigned or said.
    assert!(
        app.cli_with_plans(&pro_default, &["post", "newco", "api_requests", "1"])
            .status
            .success()
    );
    let again = serve_with(&pro_default).await;
    assert!(!again.contains("default_plan"), "{again}");
    assert_eq!(
        json(&app.cli_with_plans(&pro_default, &["accounts", "show", "acme"]))["plan_history"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Back to the built-in catalog: newco, known now, stays on pro.
    let back = serve_with(&catalog("builtin.toml", builtin.to_owned())).await;
    assert!(
        back.contains("the 1 account(s) known now keep 'pro' wherever they have no plan of their own"),
        "{back}"
    );
    assert_eq!(json(&app.cli(&["accounts", "show", "newco"]))["plan"], "pro");
    assert_eq!(json(&app.cli(&["accounts", "show", "acme"]))["plan"], "free");

    // A default that left the catalog cannot be kept: its accounts move, and that is said.
    assert!(app.cli(&["post", "late", "api_requests", "1"]).status.success());
    let renamed = catalog(
        "starter.toml",
        builtin
            .replace("\"free\"", "\"starter\"")
            .replace("plans.free", "plans.starter"),
    );
    let moved = serve_with(&renamed).await;
    assert!(
        moved.contains("default_plan changed from 'free' to 'starter', and 'free' is no longer in the catalog"),
        "{moved}"
    );
    let late = json(&app.cli_with_plans(&renamed, &["accounts", "show", "late"]));
    assert_eq!(
        (late["plan"].as_str(), late["plan_history"].as_array().map(Vec::len)),
        (Some("starter"), Some(0))
    );
}

async fn a_plan_change_applies_from_its_effective_instant(app: TestApp) {
    let before = Utc::now() - Duration::seconds(120);
    let change = Utc::now() - Duration::seconds(60);
    assert_eq!(
        consume(&app, "acme", "ai_generations", "50", "a", Some(&iso(before)))
            .await
            .status,
        200
    );
    let set = app
        .put_admin(
            "/v1/accounts/acme/plan",
            json!({"plan": "pro", "effective_at": iso(change)}),
        )
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    assert_eq!(set.body["plan"], "pro");
    assert_eq!(set.body["plan_history"][0]["plan"], "pro");
    let then = check(&app, "acme", "ai_generations", "1", Some(&iso(before))).await;
    assert_eq!(
        (then["plan"].as_str(), then["allowed"].as_bool()),
        (Some("free"), Some(false))
    );
    assert_eq!(
        consume(&app, "acme", "ai_generations", "1", "old", Some(&iso(before)))
            .await
            .status,
        429
    );
    let now = consume(&app, "acme", "ai_generations", "1", "new", None).await;
    assert_eq!(now.status, 200, "{:?}", now.body);
    assert_eq!(now.body["plan"], "pro");
    assert_eq!(now.body["limit"], Value::Null);

    // A downgrade: what the month used under pro counts against free's limit
    // from the change on. Every instant of it in one month, even in a run
    // just after the 1st's midnight: the app's clock is frozen for it.
    let real_now = Utc::now();
    let month_start = real_now
        .date_naive()
        .with_day(1)
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let frozen = if real_now - month_start < Duration::minutes(5) {
        month_start - Duration::minutes(1)
    } else {
        real_now
    };
    let (before, change) = (frozen - Duration::seconds(120), frozen - Duration::seconds(60));
    app.clock.freeze_at(frozen);
    let set_plan = |plan: &'static str, effective_at| {
        let app = &app;
        async move {
            let set = app
                .put_admin(
                    "/v1/accounts/beta/plan",
                    json!({"plan": plan, "effective_at": iso(effective_at)}),
                )
                .await;
            assert_eq!(set.status, 200, "{:?}", set.body);
        }
    };
    // Recorded before the downgrade is made (once it is, a consume dated
    // before it is held to free's limit too).
    set_plan("pro", before - Duration::seconds(60)).await;
    let under_pro = consume(&app, "beta", "ai_generations", "60", "b", Some(&iso(before))).await;
    assert_eq!(under_pro.status, 200, "{:?}", under_pro.body);
    assert_eq!(under_pro.body["plan"], "pro");
    set_plan("free", change).await;
    let under_free = consume(&app, "beta", "ai_generations", "1", "b-now", None).await;
    assert_eq!(
        (under_free.status, under_free.code()),
        (429, "quota_exceeded"),
        "{:?}",
        under_free.body
    );
    let details = &under_free.body["error"]["details"];
    assert_eq!(
        (&details["plan"], &details["used"], &details["limit"]),
        (&json!("free"), &json!("60"), &json!("50")),
        "{:?}",
        under_free.body
    );
    app.clock.thaw();
}

/// An instant a few minutes into its UTC day (so that two minutes before it
/// is the same day and month), frozen on `app`'s clock: now, or a minute
/// before midnight when the real day is younger than five minutes.
fn freeze_within_the_day(app: &TestApp) -> chrono::DateTime<Utc> {
    let real_now = Utc::now();
    let day_start = real_now.date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    let frozen = if real_now - day_start < Duration::minutes(5) {
        day_start - Duration::minutes(1)
    } else {
        real_now
    };
    app.clock.freeze_at(frozen);
    frozen
}

/// A consume dated before a downgrade (or before a lowered override) in the
/// window that is still open is held to the limit in force now too: without
/// it a service could still record up to the earlier, higher limit by
/// backdating, and the window's `used` would pass the limit in force. One
/// dated in a window that has closed is judged by that window's limits only.
async fn a_consume_dated_before_a_downgrade_in_the_same_window_is_held_to_the_limit_in_force_now(app: TestApp) {
    let frozen = freeze_within_the_day(&app);
    let (before, change) = (frozen - Duration::seconds(120), frozen - Duration::seconds(60));
    for (plan, effective_at) in [("pro", frozen - Duration::days(3)), ("free", change)] {
        let set = app
            .put_admin(
                "/v1/accounts/down/plan",
                json!({"plan": plan, "effective_at": iso(effective_at)}),
            )
            .await;
        assert_eq!(set.status, 200, "{:?}", set.body);
    }
    // ai_generations: unlimited on pro, 50 a month on free.
    let recorded = consume(&app, "down", "ai_generations", "40", "g1", Some(&iso(before))).await;
    assert_eq!(recorded.status, 200, "{:?}", recorded.body);
    let refused = consume(&app, "down", "ai_generations", "20", "g2", Some(&iso(before))).await;
    assert_eq!(
        (refused.status, refused.code()),
        (429, "quota_exceeded"),
        "{:?}",
        refused.body
    );
    let details = &refused.body["error"]["details"];
    assert_eq!(
        (&details["plan"], &details["limit"], &details["used"]),
        (&json!("free"), &json!("50"), &json!("40")),
        "{:?}",
        refused.body
    );
    let message = refused.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("on plan 'free' in force now") && message.contains(&iso(before)[..19]),
        "{message}"
    );
    // What fits both limits passes, answered with the limit at its instant.
    let fits = consume(&app, "down", "ai_generations", "10", "g3", Some(&iso(before))).await;
    assert_eq!(fits.status, 200, "{:?}", fits.body);
    assert_eq!((&fits.body["plan"], &fits.body["used"]), (&json!("pro"), &json!("50")));
    assert_eq!(app.ledger_sum("down", "ai_generations").await, 50);
    assert_eq!(check(&app, "down", "ai_generations", "1", None).await["used"], "50");

    // llm_tokens: 50 000 soft a day on pro, 1 000 hard on free. Yesterday's
    // window has closed: a consume dated in it is judged by pro alone.
    let yesterday = consume(
        &app,
        "down",
        "llm_tokens",
        "2000",
        "t1",
        Some(&iso(frozen - Duration::days(1))),
    )
    .await;
    assert_eq!(yesterday.status, 200, "{:?}", yesterday.body);
    assert_eq!(yesterday.body["plan"], "pro");
    let today = consume(&app, "down", "llm_tokens", "2000", "t2", Some(&iso(before))).await;
    assert_eq!(
        (today.status, today.code()),
        (429, "quota_exceeded"),
        "{:?}",
        today.body
    );
    assert_eq!(today.body["error"]["details"]["limit"], "1000", "{:?}", today.body);
    // 2 000 is over the whole of free's 1 000, yet the limit in force now
    // holds a consume dated today only until today ends: then pro's limit
    // at its date alone decides, and takes it.
    let tomorrow = (frozen.date_naive() + Duration::days(1))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    assert_eq!(
        retry_after(&today),
        Some(whole_seconds(tomorrow - frozen)),
        "{:?}",
        today.body
    );
    let message = today.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("after that only the limit at its date does"),
        "{message}"
    );

    // An override lowered after the instant a consume is dated: free's 50
    // then, the override's 5 now.
    let put = app
        .put_override_since("lowered", "ai_generations", json!({"limit": "5"}), change)
        .await;
    assert_eq!(put.status, 200, "{:?}", put.body);
    app.clock.freeze_at(frozen);
    let over = consume(&app, "lowered", "ai_generations", "6", "o1", Some(&iso(before))).await;
    assert_eq!((over.status, over.code()), (429, "quota_exceeded"), "{:?}", over.body);
    assert_eq!(over.body["error"]["details"]["limit"], "5", "{:?}", over.body);
    let message = over.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("set by an override of account 'lowered'") && message.contains("in force now"),
        "{message}"
    );
    let under = consume(&app, "lowered", "ai_generations", "5", "o2", Some(&iso(before))).await;
    assert_eq!(under.status, 200, "{:?}", under.body);
    assert_eq!((&under.body["limit"], &under.body["used"]), (&json!("50"), &json!("5")));
    assert_eq!(app.ledger_sum("lowered", "ai_generations").await, 5);
    app.clock.thaw();
}

/// Whole seconds in `span`, rounded up, as a `Retry-After` counts them.
fn whole_seconds(span: Duration) -> u64 {
    u64::try_from(span.num_microseconds().unwrap())
        .unwrap()
        .div_ceil(1_000_000)
}

/// A dated consume refused by the limit in force now (not by the one at
/// its date) waits for that limit to let go: the override behind it
/// expiring, whose instant its `Retry-After` and message give, or else the
/// end of its window, even for an amount over the whole of that limit. It
/// used to get the window's end, or no `Retry-After` at all, while it
/// passed as soon as the override expired.
async fn a_dated_consume_held_by_the_limit_in_force_now_is_told_when_that_limit_lets_it_through(app: TestApp) {
    let frozen = freeze_within_the_day(&app);
    let (before, change) = (frozen - Duration::seconds(120), frozen - Duration::seconds(60));
    // 30 s: before the month ends, however late in the day `frozen` is.
    let expires = frozen + Duration::seconds(30);
    let put = app
        .put_override_since(
            "expiring",
            "ai_generations",
            json!({"limit": "5", "expires_at": iso(expires)}),
            change,
        )
        .await;
    assert_eq!(put.status, 200, "{:?}", put.body);
    let put = app
        .put_override_since("lasting", "ai_generations", json!({"limit": "5"}), change)
        .await;
    assert_eq!(put.status, 200, "{:?}", put.body);
    app.clock.freeze_at(frozen);
    // free's 50 a month at `before`; the override's 5 now.
    let over = consume(&app, "expiring", "ai_generations", "6", "e1", Some(&iso(before))).await;
    assert_eq!((over.status, over.code()), (429, "quota_exceeded"), "{:?}", over.body);
    assert_eq!(
        retry_after(&over),
        Some(whole_seconds(expires - frozen)),
        "{:?}",
        over.body
    );
    let message = over.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("in force now")
            && message.contains("the override of account 'expiring' for ai_generations expires at")
            && message.contains("and then it passes (month limit 50)"),
        "{message}"
    );
    let month_end = (frozen.date_naive().with_day(1).unwrap() + chrono::Months::new(1))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let held = consume(&app, "lasting", "ai_generations", "6", "l1", Some(&iso(before))).await;
    assert_eq!((held.status, held.code()), (429, "quota_exceeded"), "{:?}", held.body);
    assert_eq!(
        retry_after(&held),
        Some(whole_seconds(month_end - frozen)),
        "{:?}",
        held.body
    );
    let message = held.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("that limit holds a consume dated in its window until the window ends at"),
        "{message}"
    );
    // Sent again once the override has expired, it passes.
    app.clock.freeze_at(expires);
    let after = consume(&app, "expiring", "ai_generations", "6", "e1", Some(&iso(before))).await;
    assert_eq!(after.status, 200, "{:?}", after.body);
    assert_eq!(app.ledger_sum("expiring", "ai_generations").await, 6);
    assert_eq!(app.ledger_sum("lasting", "ai_generations").await, 0);
    app.clock.thaw();
}

/// A dated consume refused by a month override in force now is let go when
/// the override expires, since the plan's day limit that takes over does
/// not count the day it is dated: its `Retry-After` is that instant. It was
/// the month's end: the lookup judged a consume made at the expiry, which
/// today's day limit refused (review AH).
async fn a_dated_consume_is_told_of_a_change_whose_limit_no_longer_holds_it(app: TestApp) {
    let frozen = "2026-03-10T12:00:00Z".parse::<chrono::DateTime<Utc>>().unwrap();
    let expires = frozen + Duration::seconds(15);
    app.insert(&[
        ("w", "llm_tokens", "1000", "e1", "2026-03-03T10:00:00Z"),
        ("w", "llm_tokens", "500", "e2", "2026-03-10T00:30:00Z"),
    ])
    .await;
    let put = app
        .put_override_since(
            "w",
            "llm_tokens",
            json!({"limit": "1800", "window": "month", "expires_at": iso(expires)}),
            frozen - Duration::minutes(1),
        )
        .await;
    assert_eq!(put.status, 200, "{:?}", put.body);
    // Free's 1 000 a day on 2 March (nothing used); 1 500 + 600 this month
    // under the override now.
    app.clock.freeze_at(frozen);
    let refused = consume(&app, "w", "llm_tokens", "600", "c1", Some("2026-03-02T12:00:00Z")).await;
    assert_eq!(
        (refused.status, refused.code()),
        (429, "quota_exceeded"),
        "{:?}",
        refused.body
    );
    assert_eq!(retry_after(&refused), Some(15), "{:?}", refused.body);
    let message = refused.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("the override of account 'w' for llm_tokens expires at"),
        "{message}"
    );
    app.clock.freeze_at(expires);
    let passed = consume(&app, "w", "llm_tokens", "600", "c1", Some("2026-03-02T12:00:00Z")).await;
    assert_eq!(passed.status, 200, "{:?}", passed.body);
    app.clock.thaw();
}

/// A wait that would take a dated consume's `occurred_at` past the
/// late-arrival horizon helps nothing (it would then be refused as too
/// late): no `Retry-After`, and the message says why (review AH).
async fn a_dated_consume_is_given_no_wait_that_would_take_it_past_the_late_horizon(app: TestApp) {
    let mut serve = ServeProcess::start(
        &app.database_url,
        &["--no-jobs", "--late-horizon-days", "2"],
        &[("TALLY_ADMIN_KEY", "horizon-admin")],
    )
    .await;
    let client = reqwest::Client::new();
    let send = async |method: reqwest::Method, path: &str, body: Value| {
        let reply = client
            .request(method, format!("{}{path}", serve.address()))
            .bearer_auth("horizon-admin")
            .json(&body)
            .send()
            .await
            .unwrap();
        let retry_after = reply
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        (
            reply.status().as_u16(),
            retry_after,
            reply.json::<Value>().await.unwrap(),
        )
    };
    let (status, _, body) = send(
        reqwest::Method::PUT,
        "/v1/accounts/r4/overrides/ai_generations",
        json!({"limit": "3"}),
    )
    .await;
    assert_eq!(status, 200, "{body:?}");
    // Dated a minute back, in this month (free: 50 a month) unless the
    // month is a minute old; the override's 3 holds it now, and the month
    // ends after the 2-day horizon has passed its date unless today is the
    // month's last day or two (then this test has nothing to show).
    let today = Utc::now();
    let dated = today - Duration::minutes(1);
    let month_end = (today.date_naive().with_day(1).unwrap() + chrono::Months::new(1))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    if dated.month() != today.month() || month_end <= dated + Duration::days(2) {
        assert!(serve.stop().await.success());
        return;
    }
    let (status, retry_after, body) = send(
        reqwest::Method::POST,
        "/v1/quota/consume",
        json!({"account": "r4", "resource": "ai_generations", "amount": "5", "idempotency_key": "h1",
               "occurred_at": iso(dated)}),
    )
    .await;
    assert_eq!(status, 429, "{body:?}");
    assert_eq!(retry_after, None, "{body:?}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("late-arrival horizon (2 days)"), "{message}");
    assert!(serve.stop().await.success(), "{}", serve.stderr());
}

/// A dated consume that passes a soft limit in force now (set after its
/// date, in its window) is recorded and warned about it, though the limit
/// at its date, which the answer describes, is far off: usage past the soft
/// limit is billed as overage. Its replay answers the same. It used to
/// answer with no warning at all.
async fn a_dated_consume_past_a_soft_limit_in_force_now_warns_so_and_its_replay_too(app: TestApp) {
    let frozen = freeze_within_the_day(&app);
    let (before, change) = (frozen - Duration::seconds(120), frozen - Duration::seconds(60));
    let put = app
        .put_override_since(
            "softnow",
            "llm_tokens",
            json!({"limit": "10", "enforcement": "soft"}),
            change,
        )
        .await;
    assert_eq!(put.status, 200, "{:?}", put.body);
    app.clock.freeze_at(frozen);
    let first = consume(&app, "softnow", "llm_tokens", "15", "s1", Some(&iso(before))).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    // The check fields are the limit at its date: free's 1 000 a day, hard.
    assert_eq!(
        (&first.body["limit"], &first.body["used"], &first.body["status"]),
        (&json!("1000"), &json!("15"), &json!("ok")),
        "{:?}",
        first.body
    );
    let warnings = first.body["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{:?}", first.body);
    assert_eq!(warnings[0]["code"], "soft_limit_exceeded");
    let message = warnings[0]["message"].as_str().unwrap();
    assert!(
        message.contains("over its soft day limit (15 of 10)") && message.contains("the limit in force now"),
        "{message}"
    );
    let replay = consume(&app, "softnow", "llm_tokens", "15", "s1", Some(&iso(before))).await;
    assert_eq!((replay.status, &replay.body), (200, &first.body));
    assert_eq!(app.ledger_sum("softnow", "llm_tokens").await, 15);
    app.clock.thaw();
}

/// When the limit in force now counts over another window than the one at a
/// consume's instant, the consume is held to both, each over its own
/// period: here 15 a month before the change and 10 a day after it.
async fn a_consume_dated_before_a_change_of_window_is_held_to_both_windows(app: TestApp) {
    let frozen = freeze_within_the_day(&app);
    let before = frozen - Duration::seconds(120);
    for (plan, effective_at) in [
        ("monthly", frozen - Duration::seconds(300)),
        ("daily", frozen - Duration::seconds(60)),
    ] {
        let set = app
            .put_admin(
                "/v1/accounts/w/plan",
                json!({"plan": plan, "effective_at": iso(effective_at)}),
            )
            .await;
        assert_eq!(set.status, 200, "{:?}", set.body);
    }
    let refused = consume(&app, "w", "widgets", "12", "k1", Some(&iso(before))).await;
    assert_eq!(
        (refused.status, refused.code()),
        (429, "quota_exceeded"),
        "{:?}",
        refused.body
    );
    let details = &refused.body["error"]["details"];
    assert_eq!(
        (
            &details["plan"],
            &details["window"],
            &details["limit"],
            &details["used"]
        ),
        (&json!("daily"), &json!("day"), &json!("10"), &json!("0")),
        "{:?}",
        refused.body
    );
    let recorded = consume(&app, "w", "widgets", "9", "k2", Some(&iso(before))).await;
    assert_eq!(recorded.status, 200, "{:?}", recorded.body);
    assert_eq!(
        (&recorded.body["plan"], &recorded.body["window"], &recorded.body["used"]),
        (&json!("monthly"), &json!("month"), &json!("9"))
    );
    let refused = consume(&app, "w", "widgets", "2", "k3", Some(&iso(before))).await;
    assert_eq!(
        (refused.status, refused.code()),
        (429, "quota_exceeded"),
        "{:?}",
        refused.body
    );
    let now = consume(&app, "w", "widgets", "1", "k4", None).await;
    assert_eq!(now.status, 200, "{:?}", now.body);
    assert_eq!((&now.body["plan"], &now.body["used"]), (&json!("daily"), &json!("10")));
    assert_eq!(app.ledger_sum("w", "widgets").await, 10);
    app.clock.thaw();
}

both!(plans = TWO_WINDOW_PLANS; a_consume_dated_before_a_change_of_window_is_held_to_both_windows);

/// An override outlives its resource in the catalog (and would apply again
/// were the resource put back): DELETE and `clear-override` still remove it.
async fn an_override_on_a_resource_dropped_from_the_catalog_can_still_be_removed(app: TestApp) {
    for (account, resource) in [("acme", "llm_tokens"), ("beta", "ai_generations")] {
        let set = app
            .put_admin(
                &format!("/v1/accounts/{account}/overrides/{resource}"),
                json!({"limit": "5"}),
            )
            .await;
        assert_eq!(set.status, 200, "{:?}", set.body);
    }
    let narrower = TestApp::spawn_on(app.backend, app.database_url.clone(), None, Some(TWO_WINDOW_PLANS)).await;
    let deleted = narrower.delete_admin("/v1/accounts/acme/overrides/llm_tokens").await;
    assert_eq!(deleted.status, 200, "{:?}", deleted.body);
    assert_eq!(deleted.body["resource"], "llm_tokens");
    let again = narrower.delete_admin("/v1/accounts/acme/overrides/llm_tokens").await;
    assert_eq!(
        (again.status, again.code()),
        (422, "unknown_resource"),
        "{:?}",
        again.body
    );
    let cleared = narrower.cli(&["accounts", "clear-override", "beta", "ai_generations"]);
    assert!(cleared.status.success(), "{}", String::from_utf8_lossy(&cleared.stderr));
    let shown = app.get("/v1/accounts/beta").await;
    assert_eq!(shown.body["overrides"], json!([]), "{:?}", shown.body);
    let unknown = narrower.cli(&["accounts", "clear-override", "beta", "ai_generations"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("not in the catalog"));
}

/// The override in force at an instant decides that instant's limits, as the
/// plan in force does (and as the invoice reads them): one set now does not
/// reach back to a consume dated two days ago, in check, consume and usage.
async fn an_override_applies_from_when_it_is_set_not_to_earlier_instants(app: TestApp) {
    let now = Utc::now();
    let earlier = iso(now - Duration::days(2));
    let set = app
        .put_admin("/v1/accounts/acme/overrides/llm_tokens", json!({"limit": "7"}))
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    assert_eq!(check(&app, "acme", "llm_tokens", "1", None).await["limit"], "7");
    assert_eq!(
        check(&app, "acme", "llm_tokens", "1", Some(&earlier)).await["limit"],
        "1000"
    );
    let backdated = consume(&app, "acme", "llm_tokens", "8", "then", Some(&earlier)).await;
    assert_eq!(backdated.status, 200, "{:?}", backdated.body);
    assert_eq!(backdated.body["limit"], "1000");
    let current = consume(&app, "acme", "llm_tokens", "8", "now", None).await;
    assert_eq!(
        (current.status, current.code()),
        (429, "quota_exceeded"),
        "{:?}",
        current.body
    );
    let message = current.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("limit of 7 for llm_tokens set by an override of account 'acme' (on plan 'free')"),
        "says who set the limit: {message}"
    );
    let by_plan = consume(&app, "acme", "ai_generations", "51", "plan", None).await;
    let message = by_plan.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("limit of 50 for ai_generations on plan 'free'"),
        "{message}"
    );
    let usage = app.get(&format!("/v1/accounts/acme/usage?at={earlier}")).await;
    let row = usage_row(&usage.body, "llm_tokens");
    assert_eq!(row["limit"], "1000", "{row:?}");
    assert_eq!(app.ledger_sum("acme", "llm_tokens").await, 8);
}

/// Setting and removing an override are stamped by the same clock (the
/// server's), so the history says exactly when it was in force.
async fn an_override_is_in_force_from_when_it_is_set_until_it_is_removed(app: TestApp) {
    let now = Utc::now();
    let (set_at, removed_at) = (now - Duration::hours(3), now - Duration::hours(1));
    let set = app
        .put_override_since("acme", "llm_tokens", json!({"limit": "7"}), set_at)
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    app.clock.freeze_at(removed_at);
    let removed = app.delete_admin("/v1/accounts/acme/overrides/llm_tokens").await;
    app.clock.thaw();
    assert_eq!(removed.status, 200, "{:?}", removed.body);
    for (at, limit) in [
        (set_at - Duration::minutes(1), "1000"),
        (set_at, "7"),
        (removed_at - Duration::minutes(1), "7"),
        (removed_at, "1000"),
        (now, "1000"),
    ] {
        assert_eq!(
            check(&app, "acme", "llm_tokens", "1", Some(&iso(at))).await["limit"],
            limit,
            "at {}",
            iso(at)
        );
    }
}

/// An expiry not after the moment it is set would make an override that
/// never applies: a mistake (a past date, a wrong offset), refused over HTTP
/// and by the CLI, and the override in place stays.
async fn an_override_that_would_expire_before_it_is_set_is_refused_and_changes_nothing(app: TestApp) {
    let set = app
        .put_admin("/v1/accounts/acme/overrides/llm_tokens", json!({"limit": "500"}))
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    let past = app
        .put_admin(
            "/v1/accounts/acme/overrides/llm_tokens",
            json!({"limit": "500", "expires_at": "2020-01-01T00:00:00Z"}),
        )
        .await;
    assert_eq!(past.status, 422, "{:?}", past.body);
    assert_eq!(past.body["error"]["details"]["errors"][0]["field"], "expires_at");
    let message = past.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("would never apply"), "{message}");
    assert!(
        message.ends_with("to remove an override, DELETE /v1/accounts/acme/overrides/llm_tokens"),
        "{message}"
    );
    assert_eq!(check(&app, "acme", "llm_tokens", "1", None).await["limit"], "500");
    let cli = app.cli(&[
        "accounts",
        "override",
        "acme",
        "llm_tokens",
        "--limit",
        "9",
        "--expires-at",
        "2020-01-01T00:00:00Z",
    ]);
    assert!(!cli.status.success());
    let stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(stderr.contains("would never apply"), "{stderr}");
    // Review Y: the CLI said "delete it", the API's word.
    assert!(
        stderr.contains("to remove an override, run tally accounts clear-override acme llm_tokens"),
        "{stderr}"
    );
    assert_eq!(check(&app, "acme", "llm_tokens", "1", None).await["limit"], "500");
}

async fn an_override_beats_the_plan_until_it_expires(app: TestApp) {
    let expires = Utc::now() + Duration::hours(1);
    let set = app
        .put_admin(
            "/v1/accounts/acme/overrides/llm_tokens",
            json!({"limit": "10", "expires_at": iso(expires)}),
        )
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    assert_eq!(check(&app, "acme", "llm_tokens", "1", None).await["limit"], "10");
    assert_eq!(consume(&app, "acme", "llm_tokens", "11", "big", None).await.status, 429);
    let later = check(
        &app,
        "acme",
        "llm_tokens",
        "11",
        Some(&iso(expires + Duration::seconds(1))),
    )
    .await;
    assert_eq!(
        (later["limit"].as_str(), later["allowed"].as_bool()),
        (Some("1000"), Some(true))
    );
    let unlimited = app
        .put_admin("/v1/accounts/acme/overrides/llm_tokens", json!({"limit": null}))
        .await;
    assert_eq!(unlimited.status, 200);
    assert_eq!(
        consume(&app, "acme", "llm_tokens", "5000", "huge", None).await.status,
        200
    );
    let removed = app.delete_admin("/v1/accounts/acme/overrides/llm_tokens").await;
    assert_eq!(removed.status, 200);
    assert_eq!(check(&app, "acme", "llm_tokens", "1", None).await["limit"], "1000");
    let again = app.delete_admin("/v1/accounts/acme/overrides/llm_tokens").await;
    assert_eq!(again.status, 404);
}

async fn unlimited_never_rejects_and_soft_limits_record_and_warn(app: TestApp) {
    app.put_admin("/v1/accounts/acme/plan", json!({"plan": "pro"})).await;
    let unlimited = consume(&app, "acme", "ai_generations", "999999", "u", None).await;
    assert_eq!(unlimited.status, 200, "{:?}", unlimited.body);
    assert_eq!(
        (unlimited.body["limit"].clone(), unlimited.body["remaining"].clone()),
        (Value::Null, Value::Null)
    );
    assert_eq!(unlimited.body["status"], "ok");
    // pro: llm_tokens 50 000 per day, soft, 0.00002 per token over. One
    // instant for both, so a run crossing midnight keeps one day window.
    let at = iso(Utc::now());
    let near = consume(&app, "acme", "llm_tokens", "40000", "s1", Some(&at)).await;
    assert_eq!(near.body["status"], "warning");
    assert_eq!(near.body["warnings"][0]["code"], "approaching_limit");
    let over = consume(&app, "acme", "llm_tokens", "10001", "s2", Some(&at)).await;
    assert_eq!(over.status, 200, "{:?}", over.body);
    assert_eq!(over.body["status"], "exceeded");
    assert_eq!(over.body["enforcement"], "soft");
    assert_eq!(over.body["used"], "50001");
    assert_eq!(over.body["remaining"], "0");
    assert_eq!(over.body["warnings"][0]["code"], "soft_limit_exceeded");
    assert!(
        over.body["warnings"][0]["message"]
            .as_str()
            .unwrap()
            .contains("0.00002")
    );
    assert_eq!(app.ledger_sum("acme", "llm_tokens").await, 50001);
}

async fn the_101st_request_in_a_minute_on_free_is_rate_limited_until_retry_after(app: TestApp) {
    // GCRA at 100 a minute: a burst of 100, then one more every 600 ms. On a
    // busy machine the burst itself can take longer than that, so the refusal
    // comes at the 101st request plus one per 600 ms the burst took.
    let started = std::time::Instant::now();
    let mut passed_before_limit = 0;
    let limited = loop {
        let reply = consume(
            &app,
            "acme",
            "api_requests",
            "1",
            &format!("r{passed_before_limit}"),
            None,
        )
        .await;
        if reply.status != 200 {
            break reply;
        }
        passed_before_limit += 1;
        assert!(passed_before_limit <= 200, "no rate limit after 200 requests");
    };
    let refills = u64::try_from(started.elapsed().as_millis() / 600).unwrap();
    assert!(
        (100..=100 + refills).contains(&passed_before_limit),
        "{passed_before_limit} requests passed in {:?}",
        started.elapsed()
    );
    assert_eq!(limited.status, 429, "{:?}", limited.body);
    assert_eq!(limited.code(), "rate_limited");
    // True to the limiter: the next unit comes at most 600 ms later, and
    // Retry-After is that rounded up to a whole second.
    let wait = retry_after(&limited).expect("Retry-After");
    assert_eq!(wait, 1, "{:?}", limited.headers);
    assert_eq!(
        app.ledger_sum("acme", "api_requests").await,
        i64::try_from(passed_before_limit).unwrap(),
        "a refused request writes nothing"
    );
    tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
    let passed = consume(&app, "acme", "api_requests", "1", "retried", None).await;
    assert_eq!(passed.status, 200, "{:?}", passed.body);
    let too_big = consume(&app, "acme", "api_requests", "101", "big", None).await;
    assert_eq!(too_big.status, 422, "{:?}", too_big.body);
    assert!(
        too_big.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("per-minute budget")
    );
    // Posting entries is not rate limited.
    let batch: Vec<_> = (0..300)
        .map(|i| entry("acme", "api_requests", "1", &format!("e{i}")))
        .collect();
    assert_eq!(app.post_entries(json!({ "entries": batch })).await.status, 200);
}

async fn a_rate_follows_the_plan_in_force_when_the_request_arrives_not_when_it_is_dated(app: TestApp) {
    let now = Utc::now();
    let a_minute_ago = iso(now - Duration::seconds(60));
    // Pro (no rate) since yesterday, free (100 a minute) from now: consumes
    // dated a minute ago are made now, so free's rate counts them.
    app.put_admin(
        "/v1/accounts/down/plan",
        json!({"plan": "pro", "effective_at": iso(now - Duration::days(1))}),
    )
    .await;
    app.put_admin("/v1/accounts/down/plan", json!({"plan": "free"})).await;
    let first = consume(&app, "down", "api_requests", "100", "d1", Some(&a_minute_ago)).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(
        first.body["plan"], "pro",
        "the quota is the plan's at the instant dated"
    );
    let second = consume(&app, "down", "api_requests", "100", "d2", Some(&a_minute_ago)).await;
    assert_eq!(
        (second.status, second.code()),
        (429, "rate_limited"),
        "{:?}",
        second.body
    );
    assert_eq!(app.ledger_sum("down", "api_requests").await, 100);
    // Free until now, pro from now: no rate for requests made now.
    app.put_admin("/v1/accounts/up/plan", json!({"plan": "pro"})).await;
    for key in ["u1", "u2", "u3"] {
        let reply = consume(&app, "up", "api_requests", "100", key, Some(&a_minute_ago)).await;
        assert_eq!(reply.status, 200, "{key}: {:?}", reply.body);
        assert_eq!(reply.body["plan"], "free");
    }
    assert_eq!(app.ledger_sum("up", "api_requests").await, 300);
}

async fn a_consume_with_the_key_of_a_posted_entry_records_nothing_and_answers_the_state_now_with_its_warnings(
    app: TestApp,
) {
    let posted = app.post_entries(entry("acme", "ai_generations", "45", "posted")).await;
    assert_eq!(posted.status, 200, "{:?}", posted.body);
    let reply = consume(&app, "acme", "ai_generations", "45", "posted", None).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    // The entry is recorded: allowed, though 45 more would not fit now.
    assert_eq!(reply.body["allowed"], true, "{:?}", reply.body);
    assert_eq!(reply.body["used"], "45");
    assert_eq!(reply.body["status"], "warning");
    assert_eq!(
        reply.body["warnings"][0]["code"], "approaching_limit",
        "{:?}",
        reply.body
    );
    assert_eq!(app.ledger_sum("acme", "ai_generations").await, 45, "nothing recorded");

    // Review V: a retry that leaves occurred_at out matches an entry of any
    // day; the answer is about the window that holds it, not today's.
    let yesterday = Utc::now().date_naive().pred_opt().unwrap();
    let noon = format!("{yesterday}T12:00:00Z");
    let posted = app
        .post_entries(entry_at("acme", "llm_tokens", "900", "yesterday", &noon))
        .await;
    assert_eq!(posted.status, 200, "{:?}", posted.body);
    let reply = consume(&app, "acme", "llm_tokens", "900", "yesterday", None).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["entry_id"], posted.body["entries"][0]["id"]);
    assert_eq!(
        reply.body["period_start"],
        format!("{yesterday}T00:00:00Z"),
        "{:?}",
        reply.body
    );
    assert_eq!(reply.body["used"], "900");
    assert_eq!(reply.body["status"], "warning");
    assert_eq!(app.ledger_sum("acme", "llm_tokens").await, 900, "nothing recorded");
}

async fn a_consume_retried_with_its_key_returns_the_first_outcome(app: TestApp) {
    let first = consume(&app, "acme", "ai_generations", "10", "k", None).await;
    assert_eq!(first.status, 200);
    consume(&app, "acme", "ai_generations", "5", "other", None).await;
    let again = consume(&app, "acme", "ai_generations", "10", "k", None).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body, first.body, "the first outcome, not the state now");
    assert_eq!(app.ledger_sum("acme", "ai_generations").await, 15);
    let conflicting = consume(&app, "acme", "ai_generations", "11", "k", None).await;
    assert_eq!(conflicting.status, 409);
    // One consume is not a batch: its message names the key, not a position.
    let message = conflicting.body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("idempotency_key 'k' of account 'acme'"),
        "{message}"
    );
    // After a rejection, a retry with the same key is judged afresh.
    let refused = consume(&app, "acme", "ai_generations", "40", "big", None).await;
    assert_eq!(refused.status, 429);
    app.put_admin("/v1/accounts/acme/overrides/ai_generations", json!({"limit": "100"}))
        .await;
    let retried = consume(&app, "acme", "ai_generations", "40", "big", None).await;
    assert_eq!(retried.status, 200, "{:?}", retried.body);
    assert_eq!(app.ledger_sum("acme", "ai_generations").await, 55);
}

async fn a_free_account_at_99999_requests_consumes_one_then_is_refused_until_upgraded(app: TestApp) {
    // One instant for every step: a run that crosses a month's end must not
    // split the backlog and the consumes over two windows.
    let at = iso(Utc::now());
    let backlog = entry_at("acme", "api_requests", "99999", "backlog", &at);
    assert_eq!(app.post_entries(backlog).await.status, 200);
    let last = consume(&app, "acme", "api_requests", "1", "one", Some(&at)).await;
    assert_eq!(last.status, 200, "{:?}", last.body);
    assert_eq!(last.body["used"], "100000");
    assert_eq!(last.body["remaining"], "0");
    let refused = consume(&app, "acme", "api_requests", "1", "two", Some(&at)).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.code(), "quota_exceeded");
    let until_month_end = retry_after(&refused).unwrap();
    assert!(until_month_end > 0 && until_month_end <= 31 * 86_400);
    let upgrade = app
        .put_admin("/v1/accounts/acme/plan", json!({"plan": "pro", "effective_at": at}))
        .await;
    assert_eq!(upgrade.status, 200, "{:?}", upgrade.body);
    let upgraded = consume(&app, "acme", "api_requests", "1", "two", Some(&at)).await;
    assert_eq!(upgraded.status, 200, "{:?}", upgraded.body);
    assert_eq!(upgraded.body["plan"], "pro");
    assert_eq!(upgraded.body["limit"], "1000000");
    // The month's use carries over the upgrade; the refused one never counted.
    assert_eq!(upgraded.body["used"], "100001");
}

async fn fifty_ai_generations_pass_on_free_and_the_51st_is_refused(app: TestApp) {
    let at = iso(Utc::now());
    for i in 0..50 {
        assert_eq!(
            consume(&app, "acme", "ai_generations", "1", &format!("g{i}"), Some(&at))
                .await
                .status,
            200
        );
    }
    let refused = consume(&app, "acme", "ai_generations", "1", "g50", Some(&at)).await;
    assert_eq!(refused.status, 429);
    assert!(
        retry_after(&refused).is_some(),
        "next month takes it: {:?}",
        refused.headers
    );
    assert_eq!(app.ledger_sum("acme", "ai_generations").await, 50);
    // 51 at once fits in no month of free: a Retry-After would send the
    // client back at the 1st for the same answer.
    let never = consume(&app, "other", "ai_generations", "51", "all", Some(&at)).await;
    assert_eq!(
        (never.status, never.code()),
        (429, "quota_exceeded"),
        "{:?}",
        never.body
    );
    assert_eq!(retry_after(&never), None, "{:?}", never.headers);
    let message = never.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("over the whole limit"), "{message}");
    assert_eq!(app.ledger_sum("other", "ai_generations").await, 0);
}

async fn usage_lists_every_limited_or_used_resource_with_warnings(app: TestApp) {
    // One pinned instant for the entries and the read (a day window is in it).
    let at = days_ago_at(1, "12:00:00");
    app.post_entries(json!({"entries": [
        entry_at("acme", "ai_generations", "40", "a", &at),
        entry_at("acme", "llm_tokens", "1000", "b", &at),
    ]}))
    .await;
    let reply = app.get(&format!("/v1/accounts/acme/usage?at={at}")).await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["plan"], "free");
    let rows = reply.body["resources"].as_array().unwrap();
    let names: Vec<_> = rows.iter().map(|r| r["resource"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "agent_minutes",
            "ai_generations",
            "api_requests",
            "llm_tokens",
            "storage_bytes"
        ]
    );
    let ai = &rows[1];
    assert_eq!(
        (ai["used"].as_str(), ai["limit"].as_str(), ai["remaining"].as_str()),
        (Some("40"), Some("50"), Some("10"))
    );
    assert_eq!(
        (ai["percent"].as_str(), ai["status"].as_str()),
        (Some("80"), Some("warning"))
    );
    assert_eq!(rows[3]["status"], "exceeded");
    assert_eq!(
        rows[0]["status"], "ok",
        "a zero limit with nothing used is not an excess"
    );
    let codes: Vec<_> = reply.body["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["resource"].clone(), w["code"].clone()))
        .collect();
    assert_eq!(
        codes,
        [
            (json!("ai_generations"), json!("approaching_limit")),
            (json!("llm_tokens"), json!("limit_reached"))
        ]
    );
    // The redactions below hide these; a total window has no period at all.
    let storage = usage_row(&reply.body, "storage_bytes");
    assert_eq!(
        (&storage["window"], &storage["period_start"], &storage["period_end"]),
        (&json!("total"), &Value::Null, &Value::Null),
        "{storage:?}"
    );
    insta::assert_json_snapshot!("usage_report", reply.body, {
        ".resources[].period_start" => "[period_start]",
        ".resources[].period_end" => "[period_end]",
    });
    let long_ago = app.get("/v1/accounts/acme/usage?at=2020-01-01T00:00:00Z").await;
    assert_eq!(long_ago.body["resources"][1]["used"], "0", "another month");
    // A limit lowered below what is used: the warning says over, not reached.
    // (Set before `at`: an override is in force from when it is set.)
    let before_at = chrono::DateTime::parse_from_rfc3339(&at).unwrap().to_utc() - Duration::hours(1);
    app.put_override_since("acme", "llm_tokens", json!({"limit": "500"}), before_at)
        .await;
    let lowered = app.get(&format!("/v1/accounts/acme/usage?at={at}")).await;
    let warning = lowered.body["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["resource"] == "llm_tokens")
        .expect("a warning for llm_tokens")
        .clone();
    assert_eq!(warning["code"], "limit_reached");
    let message = warning["message"].as_str().unwrap();
    assert!(message.contains("is over its day limit (1000 of 500)"), "{message}");
    assert!(message.contains("consumes in this window are refused"), "{message}");
}

async fn features_follow_the_plan(app: TestApp) {
    let free = app.get("/v1/accounts/acme/features/git_export").await;
    assert_eq!(
        free.body,
        json!({"feature": "git_export", "allowed": false, "value": false, "plan": "free"})
    );
    app.put_admin("/v1/accounts/acme/plan", json!({"plan": "scale"})).await;
    let scale = app.get("/v1/accounts/acme/features/multi_user").await;
    assert_eq!(scale.body["allowed"], true);
    let unknown = app.get("/v1/accounts/acme/features/teleport").await;
    assert_eq!(unknown.status, 404);
    assert!(
        unknown.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("git_export, multi_user")
    );
    // Review AP: a very long name is echoed by its start and length.
    let long = app
        .get(&format!("/v1/accounts/acme/features/{}", "x".repeat(50_000)))
        .await;
    assert_eq!(long.status, 404);
    let said = long.body["error"]["message"].as_str().unwrap();
    assert!(
        said.contains(&format!(
            "feature '{}…' (50000 characters) is not in the catalog",
            "x".repeat(64)
        )),
        "{said}"
    );
    assert!(long.text.len() < 1_000, "{} bytes", long.text.len());
    // The CLI twin answers the same JSON; exit 0 allowed, 1 not, 2 error.
    let cli = app.cli(&["feature", "acme", "multi_user"]);
    assert_eq!(cli.status.code(), Some(0), "{}", String::from_utf8_lossy(&cli.stderr));
    assert_eq!(serde_json::from_slice::<Value>(&cli.stdout).unwrap(), scale.body);
    // Review AT: December 9999 as over HTTP (no period is read there).
    let far = app.cli(&["feature", "acme", "multi_user", "--at", "9999-12-31"]);
    assert_eq!(far.status.code(), Some(0), "{}", String::from_utf8_lossy(&far.stderr));
    let before = app.cli(&["feature", "acme", "multi_user", "--at", "2020-01-01"]);
    assert_eq!(before.status.code(), Some(1));
    assert_eq!(
        serde_json::from_slice::<Value>(&before.stdout).unwrap(),
        json!({"feature": "multi_user", "allowed": false, "value": false, "plan": "free"})
    );
    // `at` over HTTP asks about that instant, as the CLI's `--at` does.
    let http_before = app.get("/v1/accounts/acme/features/multi_user?at=2020-01-01").await;
    assert_eq!(
        http_before.body,
        serde_json::from_slice::<Value>(&before.stdout).unwrap()
    );
    let typo = app.get("/v1/accounts/acme/features/multi_user?when=2020-01-01").await;
    assert_eq!(typo.status, 422, "{:?}", typo.body);
    let teleport = app.cli(&["feature", "acme", "teleport"]);
    assert_eq!(teleport.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&teleport.stderr).contains("git_export, multi_user"));
    let plans = app.get("/v1/plans").await;
    assert_eq!(plans.body["plans"]["pro"]["price"], "10");
    assert_eq!(
        plans.body["plans"]["pro"]["limits"]["llm_tokens"]["overage_price"],
        "0.00002"
    );
}

async fn bad_quota_and_account_input_is_refused_and_writes_nothing(app: TestApp) {
    let cases: Vec<(&str, &str, Value, u16, &str)> = vec![
        (
            "PUT",
            "/v1/accounts/acme/plan",
            json!({"plan": "gold"}),
            422,
            "unknown_plan",
        ),
        (
            "POST",
            "/v1/quota/check",
            json!({"account": "acme", "resource": "tokens"}),
            422,
            "unknown_resource",
        ),
        (
            "POST",
            "/v1/quota/check",
            json!({"account": "acme", "resource": "llm_tokens", "at": "noon"}),
            422,
            "validation_failed",
        ),
        (
            "POST",
            "/v1/quota/check",
            json!({"account": "acme", "resource": "llm_tokens", "amount": "-1"}),
            422,
            "validation_failed",
        ),
        (
            "POST",
            "/v1/quota/consume",
            json!({"account": "acme", "resource": "llm_tokens", "amount": "0", "idempotency_key": "z"}),
            422,
            "validation_failed",
        ),
        (
            "POST",
            "/v1/quota/consume",
            json!({"account": "acme", "resource": "llm_tokens", "amount": "-5", "idempotency_key": "n"}),
            422,
            "validation_failed",
        ),
        (
            "POST",
            "/v1/quota/consume",
            json!({"account": "acme", "resource": "llm_tokens", "amount": "1.5", "idempotency_key": "f"}),
            422,
            "validation_failed",
        ),
        (
            "PUT",
            "/v1/accounts/acme/overrides/llm_tokens",
            json!({"limit": "-3"}),
            422,
            "validation_failed",
        ),
        (
            "PUT",
            "/v1/accounts/acme/overrides/llm_tokens",
            json!({"limit": "lots"}),
            422,
            "validation_failed",
        ),
        (
            "PUT",
            "/v1/accounts/acme/overrides/llm_tokens",
            json!({"limit": true}),
            422,
            "validation_failed",
        ),
        (
            "PUT",
            "/v1/accounts/acme/overrides/llm_tokens",
            json!({"enforcement": "soft"}),
            422,
            "validation_failed",
        ),
        (
            "PUT",
            "/v1/accounts/acme/overrides/llm_tokens",
            json!({"limit": "5", "enforcement": "strict"}),
            422,
            "validation_failed",
        ),
        (
            "PUT",
            "/v1/accounts/acme/overrides/tokens",
            json!({"limit": "5"}),
            422,
            "unknown_resource",
        ),
        (
            "GET",
            "/v1/accounts/acme/usage?at=soon",
            Value::Null,
            422,
            "validation_failed",
        ),
        (
            "GET",
            "/v1/accounts/acme/usage?at=%2B262142-12-31",
            Value::Null,
            422,
            "validation_failed",
        ),
        // Its month would end in year 10000: no RFC 3339 period_end.
        (
            "GET",
            "/v1/accounts/acme/usage?at=9999-12-31",
            Value::Null,
            422,
            "validation_failed",
        ),
        (
            "POST",
            "/v1/quota/check",
            json!({"account": "acme", "resource": "llm_tokens", "at": "9999-12-31T23:59:59Z"}),
            422,
            "validation_failed",
        ),
        (
            "POST",
            "/v1/quota/check",
            json!({"account": "acme", "resource": "llm_tokens", "at": "+262142-12-31T00:00:00Z"}),
            422,
            "validation_failed",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let body = (!body.is_null()).then(|| body.to_string());
        let reply = app.request(method, path, Some(&app.admin_key), body).await;
        assert_eq!(
            (reply.status, reply.code()),
            (status, code),
            "{method} {path}: {:?}",
            reply.body
        );
    }
    // Review AP: reads with no period take December 9999 (a bound of the
    // listing, the instant of a feature); past year 9999 is still refused.
    for path in [
        "/v1/accounts/acme/entries?to=9999-12-31",
        "/v1/accounts/acme/entries?from=2026-01-01T00:00:00Z&to=9999-12-31T23:59:59Z",
        "/v1/accounts/acme/features/git_export?at=9999-12-15",
    ] {
        let reply = app.get(path).await;
        assert_eq!(reply.status, 200, "{path}: {:?}", reply.body);
    }
    let past = app.get("/v1/accounts/acme/entries?to=%2B10000-01-01T00:00:00Z").await;
    assert_eq!(past.status, 422, "{:?}", past.body);
    let not_text = app
        .put_admin("/v1/accounts/acme/overrides/llm_tokens", json!({"limit": true}))
        .await;
    let message = not_text.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("decimal string") && message.contains("got true"),
        "{message}"
    );
    // A limit past any decimal names that bound, not an entry's 10^15
    // (which limits do not have); an entry amount keeps its own.
    let huge = app
        .put_admin("/v1/accounts/acme/overrides/llm_tokens", json!({"limit": "1e400"}))
        .await;
    let message = huge.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("too large for any amount, limit or price") && !message.contains("10^15"),
        "{message}"
    );
    let entry_amount = app
        .post_entries(json!({"account": "acme", "resource": "llm_tokens", "amount": "1e400", "idempotency_key": "h"}))
        .await;
    let message = entry_amount.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("below 10^15"), "{message}");
    // A required field left out is `missing` everywhere, as in an entry.
    for (method, path, body) in [
        ("POST", "/v1/quota/check", json!({"account": "acme"})),
        (
            "POST",
            "/v1/quota/consume",
            json!({"account": "acme", "amount": "1", "idempotency_key": "m"}),
        ),
        ("PUT", "/v1/accounts/acme/plan", json!({})),
        ("PUT", "/v1/accounts/acme/overrides/llm_tokens", json!({})),
    ] {
        let reply = app
            .request(method, path, Some(&app.admin_key), Some(body.to_string()))
            .await;
        assert_eq!(reply.status, 422, "{method} {path}: {:?}", reply.body);
        assert_eq!(
            reply.body["error"]["details"]["errors"][0]["code"], "missing",
            "{method} {path}: {:?}",
            reply.body
        );
    }
    let service = app.key(tally::domain::Role::Service, None).await;
    let forbidden = app
        .request(
            "PUT",
            "/v1/accounts/acme/plan",
            Some(&service),
            Some(json!({"plan": "pro"}).to_string()),
        )
        .await;
    assert_eq!(forbidden.status, 403, "only admins change plans");
    assert_eq!(app.count_entries().await, 0);
    let account = app.get("/v1/accounts/acme").await;
    assert_eq!(account.body["plan_history"], json!([]));
    assert_eq!(account.body["overrides"], json!([]));
    assert_eq!(account.body["plan"], "free");
}

async fn the_cli_checks_and_reports_usage(app: TestApp) {
    app.post_entries(entry("acme", "ai_generations", "50", "full")).await;
    let refused = app.cli(&["check", "acme", "ai_generations"]);
    assert_eq!(refused.status.code(), Some(1));
    let status: Value = serde_json::from_slice(&refused.stdout).unwrap();
    assert_eq!(
        (status["used"].as_str(), status["allowed"].as_bool()),
        (Some("50"), Some(false))
    );
    let upgraded = app.cli(&["accounts", "set-plan", "acme", "pro"]);
    assert!(
        upgraded.status.success(),
        "{}",
        String::from_utf8_lossy(&upgraded.stderr)
    );
    assert!(app.cli(&["check", "acme", "ai_generations", "5"]).status.success());
    // Bad input is not a refusal: exit 2 and say what is wrong.
    let unknown = app.cli(&["check", "acme", "tokens"]);
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert_eq!(unknown.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("resource 'tokens'") && stderr.contains("api_requests"),
        "{stderr}"
    );
    assert!(unknown.stdout.is_empty());
    let zero = app.cli(&["check", "acme", "ai_generations", "0"]);
    let stderr = String::from_utf8_lossy(&zero.stderr);
    assert_eq!(zero.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("amount 0 asks about no usage"), "{stderr}");
    let negative = app.cli(&["check", "acme", "ai_generations", "-1"]);
    let stderr = String::from_utf8_lossy(&negative.stderr);
    assert_eq!(negative.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("amount -1 must be positive"), "{stderr}");
    // A date for --at, as the HTTP reads take it: its UTC midnight.
    let on_a_date = app.cli(&["usage", "acme", "--at", "2020-01-01"]);
    assert!(
        on_a_date.status.success(),
        "{}",
        String::from_utf8_lossy(&on_a_date.stderr)
    );
    let usage: Value = serde_json::from_slice(&on_a_date.stdout).unwrap();
    assert_eq!(usage["plan"], "free", "{usage}");
    let bad_at = app.cli(&["check", "acme", "ai_generations", "--at", "yesterday"]);
    assert_eq!(
        bad_at.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&bad_at.stderr)
    );
    let capped = app.cli(&[
        "accounts",
        "override",
        "acme",
        "llm_tokens",
        "--limit",
        "7",
        "--enforcement",
        "hard",
    ]);
    assert!(capped.status.success(), "{}", String::from_utf8_lossy(&capped.stderr));
    let usage: Value = serde_json::from_slice(&app.cli(&["usage", "acme"]).stdout).unwrap();
    assert_eq!(usage["plan"], "pro");
    let tokens = usage_row(&usage, "llm_tokens");
    assert_eq!(tokens["limit"], "7");
    let shown: Value = serde_json::from_slice(&app.cli(&["accounts", "show", "acme"]).stdout).unwrap();
    assert_eq!(shown["overrides"][0]["resource"], "llm_tokens");
    let gold = app.cli(&["accounts", "set-plan", "acme", "gold"]);
    assert!(String::from_utf8_lossy(&gold.stderr).contains("plans: free, pro, scale"));
}

/// `used` at `at` as a number, from a check.
async fn used_at(app: &TestApp, account: &str, resource: &str, at: &str) -> i64 {
    check(app, account, resource, "1", Some(at)).await["used"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

async fn a_cached_check_stays_exact_after_a_rollup_and_after_another_process_inserts(app: TestApp) {
    // One pinned instant for every entry and read (llm_tokens counts per day).
    let at = days_ago_at(1, "12:00:00");
    let at_instant = chrono::DateTime::parse_from_rfc3339(&at).unwrap().to_utc();
    // A second store on the same database stands for another process: its
    // inserts bypass this app's settled-sum cache, and it has a cache of its own.
    let other = tally::store::connect(&app.database_url, app.catalog.clone())
        .await
        .unwrap();
    let other_quotas = |account: &'static str, resource: &'static str| {
        let other = other.clone();
        let at = at_instant;
        let catalog = app.catalog.clone();
        async move {
            let quotas = tally::usage::quota::Quotas {
                store: other.as_ref(),
                catalog: &catalog,
            };
            let resource = tally::domain::ResourceName::parse(resource).unwrap();
            let account = tally::domain::AccountId::parse(account).unwrap();
            let one = tally::domain::Amount::from_minor(1, 0);
            quotas.check(&account, &resource, one, at).await.unwrap().used
        }
    };
    for resource in ["storage_bytes", "llm_tokens"] {
        let batch: Vec<_> = (0..40)
            .map(|i| entry_at("acme", resource, "5", &format!("{resource}-a{i}"), &at))
            .collect();
        assert_eq!(app.post_entries(json!({ "entries": batch })).await.status, 200);
        // Warm both caches.
        assert_eq!(used_at(&app, "acme", resource, &at).await, 200);
        assert_eq!(other_quotas("acme", resource).await, "200");

        let inputs = (0..7)
            .map(|i| {
                serde_json::from_value(json!({
                    "account": "acme", "resource": resource, "amount": "3",
                    "idempotency_key": format!("{resource}-b{i}"), "occurred_at": at,
                }))
                .unwrap()
            })
            .collect();
        let rules = tally::domain::entry::EntryRules {
            catalog: &app.catalog,
            now: Utc::now(),
            late_horizon: Duration::days(35),
            allow_late: false,
            too_late: tally::domain::entry::BACKFILL,
        };
        let theirs = tally::domain::entry::validate_batch(inputs, rules).unwrap().entries;
        other.insert_entries(&theirs).await.unwrap();
        assert_eq!(
            used_at(&app, "acme", resource, &at).await,
            221,
            "rows another process inserted count"
        );
        assert_eq!(app.ledger_sum("acme", resource).await, 221);

        app.rollup().await;
        assert_eq!(
            used_at(&app, "acme", resource, &at).await,
            221,
            "a rollup moves rows, not the sum"
        );
        assert_eq!(other_quotas("acme", resource).await, "221");

        // Half folded, half not; and a correction.
        assert_eq!(
            app.post_entries(entry_at("acme", resource, "-4", &format!("{resource}-c"), &at))
                .await
                .status,
            200
        );
        assert_eq!(used_at(&app, "acme", resource, &at).await, 217);
        app.rollup().await;
        let more: Vec<_> = (0..3)
            .map(|i| entry_at("acme", resource, "2", &format!("{resource}-d{i}"), &at))
            .collect();
        assert_eq!(app.post_entries(json!({ "entries": more })).await.status, 200);
        assert_eq!(used_at(&app, "acme", resource, &at).await, 223);
        assert_eq!(other_quotas("acme", resource).await, "223");
        assert_eq!(app.ledger_sum("acme", resource).await, 223);
    }
}

async fn a_consume_replays_its_first_outcome_after_the_plan_changes(app: TestApp) {
    let first = consume(&app, "acme", "ai_generations", "45", "k", None).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.body["plan"], "free");
    assert_eq!(first.body["limit"], "50");
    assert_eq!(first.body["used"], "45");
    assert_eq!(first.body["remaining"], "5");
    assert_eq!(first.body["status"], "warning");
    assert_eq!(first.body["warnings"][0]["code"], "approaching_limit");
    let upgraded = app.put_admin("/v1/accounts/acme/plan", json!({"plan": "pro"})).await;
    assert_eq!(upgraded.status, 200, "{:?}", upgraded.body);
    let again = consume(&app, "acme", "ai_generations", "45", "k", None).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.body, first.body, "the first outcome, on the plan of then");
    let next = consume(&app, "acme", "ai_generations", "45", "k2", None).await;
    assert_eq!(next.status, 200);
    assert_eq!(next.body["plan"], "pro");
    assert_eq!(next.body["limit"], Value::Null);
    assert_eq!(next.body["used"], "90");
    assert_eq!(app.ledger_sum("acme", "ai_generations").await, 90);
}

async fn an_override_written_by_another_process_applies_to_the_next_consume_at_once(app: TestApp) {
    for i in 0..5 {
        assert_eq!(
            consume(&app, "acme", "ai_generations", "10", &format!("a{i}"), None)
                .await
                .status,
            200
        );
    }
    let refused = consume(&app, "acme", "ai_generations", "1", "over", None).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.body["error"]["details"]["used"], "50");
    // By another process: `tally` on another host.
    let set = app.cli(&["accounts", "override", "acme", "ai_generations", "--limit", "60"]);
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    let passed = consume(&app, "acme", "ai_generations", "1", "over", None).await;
    assert_eq!(passed.status, 200, "{:?}", passed.body);
    assert_eq!(passed.body["limit"], "60");
    assert_eq!(passed.body["used"], "51");
    let cleared = app.cli(&["accounts", "clear-override", "acme", "ai_generations"]);
    assert!(cleared.status.success(), "{}", String::from_utf8_lossy(&cleared.stderr));
    let refused = consume(&app, "acme", "ai_generations", "1", "over-again", None).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.body["error"]["details"]["limit"], "50");
    assert_eq!(app.ledger_sum("acme", "ai_generations").await, 51);
}

async fn an_override_with_another_window_counts_over_that_window_in_check_and_consume(app: TestApp) {
    // llm_tokens counts per day on free; the override makes it a month. The
    // check and consume first read the likely (day) period, then the month.
    // A day that is not its month's 1st (today, or yesterday on a 1st), so
    // the month holds an earlier day whose row only the month window counts;
    // its first second, so it is never in the future.
    let today = Utc::now().date_naive();
    let day = if today.day() > 1 {
        today
    } else {
        today.pred_opt().unwrap()
    };
    let at = iso(day.and_hms_opt(0, 0, 1).unwrap().and_utc());
    let first_of_month = iso(day.with_day(1).unwrap().and_hms_opt(12, 0, 0).unwrap().and_utc());
    app.insert(&[("acme", "llm_tokens", "7", "early", &first_of_month)])
        .await;
    assert_eq!(
        consume(&app, "acme", "llm_tokens", "10", "k1", Some(&at)).await.status,
        200
    );
    // Set before `at`: an override is in force from when it is set.
    let put = app
        .put_override_since(
            "acme",
            "llm_tokens",
            json!({"limit": "5000", "window": "month"}),
            day.and_hms_opt(0, 0, 0).unwrap().and_utc(),
        )
        .await;
    assert_eq!(put.status, 200, "{:?}", put.body);
    let body = check(&app, "acme", "llm_tokens", "1", Some(&at)).await;
    assert_eq!(body["window"], "month");
    assert_eq!(body["limit"], "5000");
    assert_eq!(body["used"], "17");
    let consumed = consume(&app, "acme", "llm_tokens", "5", "k2", Some(&at)).await;
    assert_eq!(consumed.status, 200, "{:?}", consumed.body);
    assert_eq!(consumed.body["window"], "month");
    assert_eq!(consumed.body["used"], "22");
    // Removed now: from now on the plan's day counts; at `at` the override
    // was in force, and stays so in the history.
    let deleted = app.delete_admin("/v1/accounts/acme/overrides/llm_tokens").await;
    assert!(deleted.status < 300, "{:?}", deleted.body);
    assert_eq!(check(&app, "acme", "llm_tokens", "1", None).await["window"], "day");
    let body = check(&app, "acme", "llm_tokens", "1", Some(&at)).await;
    assert_eq!(body["window"], "month");
    assert_eq!(body["used"], "22");
}

/// The same idempotency key returns the first outcome (API.md, consume),
/// whatever the plan says now: 150 api_requests recorded on pro (no rate)
/// and retried after a downgrade to free (100 a minute) replay the first
/// answer, while a new key for 150 is still refused with 422 and writes
/// nothing. The per-minute budget used to be judged before the key was looked
/// up, so the retry got 422.
async fn a_consume_recorded_on_a_plan_without_a_rate_replays_its_first_outcome_after_a_downgrade_to_one(app: TestApp) {
    let set_plan = |plan: &'static str| {
        let app = &app;
        async move {
            let reply = app.put_admin("/v1/accounts/acme/plan", json!({ "plan": plan })).await;
            assert_eq!(reply.status, 200, "{:?}", reply.body);
        }
    };
    set_plan("pro").await;
    let first = consume(&app, "acme", "api_requests", "150", "k", None).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.body["plan"], "pro");
    set_plan("free").await;
    let again = consume(&app, "acme", "api_requests", "150", "k", None).await;
    assert_eq!(again.status, 200, "{:?}", again.body);
    assert_eq!(again.body, first.body, "the first outcome, on the plan of then");
    let new_key = consume(&app, "acme", "api_requests", "150", "k2", None).await;
    assert_eq!(new_key.status, 422, "{:?}", new_key.body);
    assert!(
        new_key.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("per-minute budget of 100")
    );
    assert_eq!(app.ledger_sum("acme", "api_requests").await, 150);
}

/// A consume decides against the limits in force when it holds the lock
/// (invariant 5): another process lowers `api_requests` (a resource with a
/// rate, decided in Rust on both engines) from 10 to 5 while holding the lock
/// a consume waits for; once that commits, the consume sees 5 used of 5 and
/// is refused. The plan and overrides used to be read before the lock, so it
/// recorded a sixth unit against the limit of 10 that no longer held.
async fn a_limit_lowered_while_a_consume_waits_for_the_lock_applies_to_it(app: TestApp) {
    let put = app
        .put_admin("/v1/accounts/acme/overrides/api_requests", json!({"limit": "10"}))
        .await;
    assert_eq!(put.status, 200, "{:?}", put.body);
    assert_eq!(consume(&app, "acme", "api_requests", "5", "a", None).await.status, 200);
    // As the store writes an override: the current row and its history,
    // which decides (the override in force at an instant).
    let (changed_at, kept) = match app.backend {
        Backend::Sqlite => (Utc::now().timestamp_micros().to_string(), "0"),
        Backend::Postgres => ("now()".to_owned(), "false"),
    };
    let lower = [
        "UPDATE account_overrides SET limit_amount = 5 WHERE account = 'acme'".to_owned(),
        format!(
            "INSERT INTO account_override_history (account, resource, limit_amount, changed_at, removed) \
             VALUES ('acme', 'api_requests', 5, {changed_at}, {kept})"
        ),
    ];
    let app = Arc::new(app);
    let reply = consume_1_while_another_process_writes_under_the_lock(&app, "api_requests", &lower).await;
    assert_eq!(
        (reply.status, reply.code()),
        (429, "quota_exceeded"),
        "{:?}",
        reply.body
    );
    assert_eq!(reply.body["error"]["details"]["limit"], "5");
    assert_eq!(reply.body["error"]["details"]["used"], "5");
    assert_eq!(app.ledger_sum("acme", "api_requests").await, 5);
}

/// Usage another process records while a consume waits for the lock counts
/// against that consume, on both of PostgreSQL's consume paths: a
/// rate-limited resource (`api_requests`, decided in Rust between the
/// store's statements) and one without a rate (`ai_generations`, decided
/// in the grouped call). A `used` read before the lock, or no lock, lets the
/// consume through past the limit.
async fn usage_recorded_while_a_consume_waits_for_the_lock_counts_against_it(app: TestApp) {
    let app = Arc::new(app);
    for resource in ["api_requests", "ai_generations"] {
        let put = app
            .put_admin(
                &format!("/v1/accounts/acme/overrides/{resource}"),
                json!({"limit": "10"}),
            )
            .await;
        assert_eq!(put.status, 200, "{:?}", put.body);
        let first = consume(&app, "acme", resource, "5", &format!("first-{resource}"), None).await;
        assert_eq!(first.status, 200, "{resource}: {:?}", first.body);
        let now = match app.backend {
            Backend::Sqlite => Utc::now().timestamp_micros().to_string(),
            Backend::Postgres => "now()".to_owned(),
        };
        let five_more = format!(
            "INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key) \
             VALUES ('acme', '{resource}', 5, {now}, {now}, 'other-{resource}')"
        );
        let reply = consume_1_while_another_process_writes_under_the_lock(&app, resource, &[five_more]).await;
        assert_eq!(
            (reply.status, reply.code()),
            (429, "quota_exceeded"),
            "{resource}: {:?}",
            reply.body
        );
        assert_eq!(reply.body["error"]["details"]["used"], "10", "{resource}");
        assert_eq!(app.ledger_sum("acme", resource).await, 10, "{resource}");
    }
}

/// Consumes 1 of `resource` for `acme` while another process holds the
/// consume lock (SQLite's write lock, taken by its first write;
/// PostgreSQL's advisory lock) and runs `writes`, committing them once the
/// consume waits (PostgreSQL) or could be waiting (SQLite shows no waiter
/// from outside). The consume's answer.
async fn consume_1_while_another_process_writes_under_the_lock(
    app: &Arc<TestApp>,
    resource: &str,
    writes: &[String],
) -> Reply {
    let consuming = {
        let (app, resource) = (app.clone(), resource.to_owned());
        move || {
            tokio::spawn(async move {
                let sent = std::time::Instant::now();
                let key = format!("waiting-{resource}");
                (consume(&app, "acme", &resource, "1", &key, None).await, sent)
            })
        }
    };
    match app.backend {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&app.database_url).await.unwrap();
            let mut other = pool.begin().await.unwrap();
            for sql in writes {
                sqlx::query(sql).execute(&mut *other).await.unwrap();
            }
            let consuming = consuming();
            // A settle time, and a check below that the request went out
            // before the commit (it cannot show the consume waited on the
            // lock, only that it could).
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            let committed = std::time::Instant::now();
            other.commit().await.unwrap();
            let (reply, sent) = consuming.await.unwrap();
            assert!(
                sent < committed,
                "the consume was sent before the other process committed"
            );
            reply
        }
        Backend::Postgres => {
            let (pool, mut other) = holding_the_consume_lock(app, "acme", resource).await;
            for sql in writes {
                sqlx::query(sql).execute(&mut *other).await.unwrap();
            }
            let consuming = consuming();
            until_a_backend_waits_on_a_lock(&pool, "the consume never waited on the consume lock").await;
            other.commit().await.unwrap();
            consuming.await.unwrap().0
        }
    }
}

/// A plan whose rate limits a resource with decimals, 2 units a minute of
/// `gpu_minutes` (2 fractional digits).
const DECIMAL_RATE_PLANS: &str = r#"
default_plan = "free"

[resources.gpu_minutes]
decimals = 2

[plans.free]
price = "0"

[plans.free.limits.gpu_minutes]
window = "month"
limit = "unlimited"
rate_per_minute = 2
"#;

/// `rate_per_minute` counts units of the resource (docs/plans.md), so with a
/// rate of 2 a minute four consumes of 0.5 pass at once and the fifth waits;
/// 2.01 can never fit (422) and 2 can. Amounts used to be rounded up to whole
/// units, so each 0.5 counted as 1 and the third was refused.
async fn a_rate_counts_fractional_amounts_exactly(app: TestApp) {
    let started = std::time::Instant::now();
    for i in 0..4 {
        let reply = consume(&app, "acme", "gpu_minutes", "0.5", &format!("half{i}"), None).await;
        assert_eq!(reply.status, 200, "consume {i} of 0.5: {:?}", reply.body);
    }
    let fifth = consume(&app, "acme", "gpu_minutes", "0.5", "half4", None).await;
    assert_eq!((fifth.status, fifth.code()), (429, "rate_limited"), "{:?}", fifth.body);
    // The limiter's wait is 15 s (0.5 of 2 a minute) less the time these
    // requests took, rounded up: 15 while they took under a second, so a
    // client that waits exactly Retry-After is let through.
    let took = started.elapsed().as_secs();
    assert!(
        retry_after(&fifth).is_some_and(|s| (15 - took.min(14)..=15).contains(&s)),
        "after {took} s: {:?}",
        fifth.headers
    );
    let too_big = consume(&app, "other", "gpu_minutes", "2.01", "big", None).await;
    assert_eq!(too_big.status, 422, "{:?}", too_big.body);
    let whole = consume(&app, "other", "gpu_minutes", "2", "whole", None).await;
    assert_eq!(whole.status, 200, "{:?}", whole.body);
    assert_eq!(app.ledger_sum("acme", "gpu_minutes").await, 200);
    assert_eq!(app.ledger_sum("other", "gpu_minutes").await, 200);
}

both!(plans = DECIMAL_RATE_PLANS; a_rate_counts_fractional_amounts_exactly);

/// A consume whose key another transaction holds, uncommitted, for another
/// resource waits for it and, once it commits, answers 409: never a second
/// row, never a 500 (the one case where PostgreSQL's consume group finds its
/// INSERT skipped with nothing else decided on it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_consume_meeting_its_key_committed_meanwhile_for_another_resource_is_a_conflict() {
    let Some(app) = TestApp::spawn(Backend::Postgres).await else {
        return;
    };
    let pool = sqlx::PgPool::connect(&app.database_url).await.unwrap();
    let mut other = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key)
         VALUES ('acme', 'llm_tokens', 1, now(), now(), 'k')",
    )
    .execute(&mut *other)
    .await
    .unwrap();
    let app = Arc::new(app);
    let consuming = {
        let app = app.clone();
        tokio::spawn(async move { consume(&app, "acme", "ai_generations", "1", "k", None).await })
    };
    until_a_backend_waits_on_a_lock(&pool, "the consume never waited on the key").await;
    other.commit().await.unwrap();
    let reply = consuming.await.unwrap();
    assert_eq!(reply.status, 409, "{:?}", reply.body);
    assert_eq!(reply.code(), "idempotency_conflict");
    assert_eq!(app.count_entries().await, 1);
}

/// A consume whose key another transaction holds, uncommitted, with the same
/// content waits for it and, once it commits, answers 200 as its replay
/// (review AJ), spending none of the rate (review AM) — on the per-resource
/// path (`api_requests`, which has a rate) and in a consume group
/// (`ai_generations`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_consume_meeting_its_key_committed_meanwhile_with_the_same_content_is_its_replay() {
    let Some(app) = TestApp::spawn(Backend::Postgres).await else {
        return;
    };
    let pool = sqlx::PgPool::connect(&app.database_url).await.unwrap();
    let app = Arc::new(app);
    for resource in ["api_requests", "ai_generations"] {
        let mut other = pool.begin().await.unwrap();
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key)
             VALUES ('acme', $1, 3, now(), now(), $1) RETURNING id",
        )
        .bind(resource)
        .fetch_one(&mut *other)
        .await
        .unwrap();
        let consuming = {
            let app = app.clone();
            tokio::spawn(async move { consume(&app, "acme", resource, "3", resource, None).await })
        };
        until_a_backend_waits_on_a_lock(&pool, "the consume never waited on the key").await;
        other.commit().await.unwrap();
        let reply = consuming.await.unwrap();
        assert_eq!(reply.status, 200, "{resource}: {:?}", reply.body);
        assert_eq!(reply.body["entry_id"], id, "{resource}: {:?}", reply.body);
        assert_eq!(reply.body["used"], "3", "{resource}: {:?}", reply.body);
    }
    assert_eq!(app.count_entries().await, 2, "nothing recorded by the consumes");
    // Review AM: nor counted against the rate (100 a minute on free): a
    // consume that records nothing used to spend its units all the same.
    let fresh = consume(&app, "acme", "api_requests", "98", "fresh", None).await;
    assert_eq!(fresh.status, 200, "{:?}", fresh.body);
}

/// One call of `tally_consume_group` with the given consumes of `acme`
/// (`llm_tokens`, amount 1, keys `{prefix}0`, `{prefix}1`, …) at the given instants, on the
/// catalog's free rules (1 000 a day, hard): each consume's (outcome, used),
/// or the error's SQLSTATE.
async fn consume_group_directly(
    pool: &sqlx::PgPool,
    prefix: &str,
    at: &[chrono::DateTime<Utc>],
) -> Result<Vec<(String, i64)>, String> {
    let decided = consume_group_with_watermark(pool, prefix, at, None).await?;
    Ok(decided.into_iter().map(|d| (d.outcome, d.used)).collect())
}

/// A settled-sum watermark as the store caches it: the period's bounds, the
/// mark and the sum of the period's rows below it.
#[derive(Clone, Copy)]
struct Watermark {
    start: chrono::NaiveDate,
    end: chrono::NaiveDate,
    mark: i64,
    settled: i64,
}

/// What `tally_consume_group` answered for one consume.
#[derive(Debug, sqlx::FromRow)]
struct DirectlyDecided {
    outcome: String,
    used: i64,
    mark: i64,
    settled: i64,
}

/// As [`consume_group_directly`], every consume offering `known` as its
/// watermark; answers the new watermarks too.
async fn consume_group_with_watermark(
    pool: &sqlx::PgPool,
    prefix: &str,
    at: &[chrono::DateTime<Utc>],
    known: Option<Watermark>,
) -> Result<Vec<DirectlyDecided>, String> {
    let n = at.len();
    let keys: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let rules = json!({"llm_tokens": {"free": {"limit": 1000, "enforcement": "hard", "window": "day", "price": null}}});
    let rows = sqlx::query_as(
        "SELECT outcome, COALESCE(used, -1) AS used, COALESCE(mark, -1) AS mark, COALESCE(settled, -1) AS settled
           FROM tally_consume_group('free', $1::jsonb, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, now())
          ORDER BY idx",
    )
    .bind(rules.to_string())
    .bind(vec!["acme"; n])
    .bind(vec!["llm_tokens"; n])
    .bind(vec![1_i64; n])
    .bind(at)
    .bind(&keys)
    .bind(vec![None::<String>; n])
    .bind(vec![None::<String>; n])
    .bind(vec![None::<i64>; n])
    .bind(vec![known.map(|k| k.start); n])
    .bind(vec![known.map(|k| k.end); n])
    .bind(vec![known.map(|k| k.mark); n])
    .bind(vec![known.map(|k| k.settled); n])
    .fetch_all(pool)
    .await;
    match rows {
        Ok(rows) => Ok(rows),
        Err(sqlx::Error::Database(e)) => Err(e.code().unwrap_or_default().into_owned()),
        Err(other) => panic!("{other}"),
    }
}

/// A PostgreSQL consume group reads `used` from the caller's watermark when it
/// is for the consume's period and not newer than the group's snapshot: the
/// settled sum as given plus the rows since the mark (entries posted
/// meanwhile included). A watermark of another period, or from a newer
/// snapshot, is ignored and `used` is read whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_consume_group_reads_used_from_a_watermark_only_when_it_holds() {
    let Some(app) = TestApp::spawn(Backend::Postgres).await else {
        return;
    };
    let pool = sqlx::PgPool::connect(&app.database_url).await.unwrap();
    let now = Utc::now();
    let first = consume_group_with_watermark(&pool, "a", &[now], None).await.unwrap();
    assert_eq!((first[0].outcome.as_str(), first[0].used), ("recorded", 0));
    let today = now.date_naive();
    let known = Watermark {
        start: today,
        end: today + Duration::days(1),
        mark: first[0].mark,
        settled: first[0].settled,
    };
    // Dated like the consumes, so that all fall on one day even across midnight.
    let posted_at = |amount: &str, key: &str| {
        let mut posted = entry("acme", "llm_tokens", amount, key);
        posted["occurred_at"] = json!(iso(now));
        posted
    };
    let posted = app
        .post_entries(json!({"entries": [posted_at("5", "p1"), posted_at("7", "p2")]}))
        .await;
    assert_eq!(posted.status, 200, "{:?}", posted.body);
    // `used` of each consume of one group at `now`, offering `known`.
    let used_with = async |prefix: &str, consumes: usize, known: Watermark| -> Vec<i64> {
        let decided = consume_group_with_watermark(&pool, prefix, &vec![now; consumes], Some(known))
            .await
            .unwrap();
        decided.iter().map(|d| d.used).collect()
    };

    // Honest: 1 consumed + 12 posted, then the group's own first consume.
    assert_eq!(used_with("b", 2, known).await, [13, 14]);
    // The settled sum is taken as given, not re-read: 100 more than the truth
    // shows in `used`, which is how this test knows the watermark was used.
    let trusted = Watermark {
        settled: known.settled + 100,
        ..known
    };
    assert_eq!(used_with("c", 1, trusted).await, [115]);
    // Ignored: a watermark of yesterday, and one newer than any snapshot.
    let yesterday = Watermark {
        start: today - Duration::days(1),
        end: today,
        ..trusted
    };
    assert_eq!(used_with("d", 1, yesterday).await, [16]);
    let future = Watermark {
        mark: known.mark + 1_000_000,
        ..trusted
    };
    assert_eq!(used_with("e", 1, future).await, [17]);
    assert_eq!(app.ledger_sum("acme", "llm_tokens").await, 18);
}

/// A PostgreSQL consume group is decided in arrival order per (account,
/// resource, period): consumes of two days interleaved in one group each see
/// their own day's `used`, including the group's earlier consumes of that day;
/// a group that counts one (account, resource) over two windows refuses to
/// decide (SQLSTATE TL001) and its caller decides each consume alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_consume_group_keeps_used_per_period_and_refuses_two_windows_of_one_key() {
    let Some(app) = TestApp::spawn(Backend::Postgres).await else {
        return;
    };
    let pool = sqlx::PgPool::connect(&app.database_url).await.unwrap();
    let today = Utc::now();
    let yesterday = today - Duration::days(1);
    // Set before both days' consumes: an override is in force from when it is set.
    let put = app
        .put_override_since(
            "acme",
            "llm_tokens",
            json!({"limit": "2"}),
            yesterday - Duration::hours(1),
        )
        .await;
    assert_eq!(put.status, 200, "{:?}", put.body);
    let decided = consume_group_directly(&pool, "a", &[yesterday, today, yesterday, today, yesterday, today])
        .await
        .unwrap();
    let expected: Vec<(String, i64)> = [
        ("recorded", 0),
        ("recorded", 0),
        ("recorded", 1),
        ("recorded", 1),
        ("rejected", 2),
        ("rejected", 2),
    ]
    .into_iter()
    .map(|(outcome, used)| (outcome.to_owned(), used))
    .collect();
    assert_eq!(decided, expected);
    assert_eq!(app.ledger_sum("acme", "llm_tokens").await, 4);

    // A month-window override that expired an hour ago: a consume before it
    // counts over the month, one after over the plan's day.
    let put = app
        .put_override_since(
            "acme",
            "llm_tokens",
            json!({"limit": "100", "window": "month", "expires_at": iso(today - Duration::hours(1))}),
            today - Duration::hours(3),
        )
        .await;
    assert_eq!(put.status, 200, "{:?}", put.body);
    let two_windows = consume_group_directly(&pool, "b", &[today - Duration::hours(2), today]).await;
    assert_eq!(two_windows, Err("TL001".to_owned()));
    assert_eq!(
        app.ledger_sum("acme", "llm_tokens").await,
        4,
        "the refused group wrote nothing"
    );
}

/// A PostgreSQL consume group with a dated consume (`tally_consume_group_dated`) holds it (one given
/// an answering instant, `now`) to the limit in force then too, when the
/// window that limit counts in holds the consume: past it, `rejected_now`
/// with that limit; over another window, `undecided` (Rust decides it on the
/// multi-statement path), writing nothing. A consume stamped now (no `now`
/// given) is held to its instant's limit alone. Dated consumes used to
/// bypass the group entirely, at a third of the throughput.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_consume_group_holds_a_dated_consume_to_the_limit_in_force_now_too() {
    let Some(app) = TestApp::spawn(Backend::Postgres).await else {
        return;
    };
    let pool = sqlx::PgPool::connect(&app.database_url).await.unwrap();
    let at = |day_time: &str| format!("2026-03-{day_time}Z").parse::<chrono::DateTime<Utc>>().unwrap();
    for (limit, since) in [
        (json!({"limit": "2"}), "10T08:00:00"),
        (json!({"limit": "1"}), "10T11:00:00"),
    ] {
        let put = app.put_override_since("acme", "llm_tokens", limit, at(since)).await;
        assert_eq!(put.status, 200, "{:?}", put.body);
    }
    // (outcome, used, limit in the context, limit in force now in the
    // context) of one group of consumes of 1 at `occurred_at`, each answered
    // at `now` (None: stamped now).
    type Row = (String, i64, Option<i64>, Option<i64>);
    let group = async |prefix: &str, consumes: &[(&str, Option<&str>)]| -> Vec<Row> {
        let n = consumes.len();
        let keys: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
        let occurred: Vec<_> = consumes.iter().map(|(o, _)| at(o)).collect();
        let nows: Vec<_> = consumes.iter().map(|(_, now)| now.map(at)).collect();
        let rules =
            json!({"llm_tokens": {"free": {"limit": 1000, "enforcement": "hard", "window": "day", "price": null}}});
        sqlx::query_as::<_, Row>(
            "SELECT outcome, COALESCE(used, -1), (context::jsonb ->> 'limit')::bigint,
                    (context::jsonb -> 'now' ->> 'limit')::bigint
               FROM tally_consume_group_dated('free', $1::jsonb, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, now())
              ORDER BY idx",
        )
        .bind(rules.to_string())
        .bind(vec!["acme"; n])
        .bind(vec!["llm_tokens"; n])
        .bind(vec![1_i64; n])
        .bind(&occurred)
        .bind(&keys)
        .bind(vec![None::<String>; n])
        .bind(vec![None::<String>; n])
        .bind(vec![None::<i64>; n])
        .bind(vec![None::<chrono::NaiveDate>; n])
        .bind(vec![None::<chrono::NaiveDate>; n])
        .bind(vec![None::<i64>; n])
        .bind(vec![None::<i64>; n])
        .bind(&nows)
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    // Dated 10:00 (the limit then: 2), answered at 12:00 (the limit now: 1).
    let decided = group(
        "a",
        &[
            ("10T10:00:00", Some("10T12:00:00")),
            ("10T10:00:00", Some("10T12:00:00")),
            ("10T10:00:00", None),
        ],
    )
    .await;
    // The first, recorded, also stores the limit in force now it was held
    // to (its answer warns under it).
    assert_eq!(
        decided,
        [
            ("recorded".to_owned(), 0, Some(2), Some(1)),
            ("rejected_now".to_owned(), 1, Some(1), None),
            ("recorded".to_owned(), 1, Some(2), None),
        ]
    );
    assert_eq!(app.ledger_sum("acme", "llm_tokens").await, 2);
    // Dated 07:00, before the overrides (the plan's 1 000 a day): held to
    // the limit of 12:00 on the same day, not to that of the next day, whose
    // window does not hold 10 March.
    let before_the_overrides = group(
        "b",
        &[
            ("10T07:00:00", Some("10T12:00:00")),
            ("10T07:00:00", Some("11T12:00:00")),
        ],
    )
    .await;
    assert_eq!(
        before_the_overrides,
        [
            ("rejected_now".to_owned(), 2, Some(1), None),
            ("recorded".to_owned(), 2, Some(1000), None),
        ]
    );
    assert_eq!(app.ledger_sum("acme", "llm_tokens").await, 3);

    // From 11:30 the override counts per month: a consume dated 10:00 (a day
    // window then) answered at 12:00 counts in two windows.
    let put = app
        .put_override_since(
            "acme",
            "llm_tokens",
            json!({"limit": "100", "window": "month"}),
            at("10T11:30:00"),
        )
        .await;
    assert_eq!(put.status, 200, "{:?}", put.body);
    let two_windows = group("c", &[("10T10:00:00", Some("10T12:00:00")), ("10T10:00:00", None)]).await;
    assert_eq!(
        two_windows,
        [
            ("undecided".to_owned(), 3, None, None),
            ("rejected".to_owned(), 3, Some(2), None)
        ]
    );
    assert_eq!(app.ledger_sum("acme", "llm_tokens").await, 3, "neither wrote anything");
    // An undecided consume records nothing here, so it is no second window
    // of its key beside one stamped 12:00 (the month override): the group
    // is decided, not refused as one to decide a consume at a time (TL001),
    // which sent every consume of it, other accounts' too, one at a time.
    let beside_a_month_consume = group("d", &[("10T10:00:00", Some("10T12:00:00")), ("10T12:00:00", None)]).await;
    assert_eq!(
        beside_a_month_consume,
        [
            ("undecided".to_owned(), 3, None, None),
            ("recorded".to_owned(), 3, Some(100), None)
        ]
    );
    assert_eq!(app.ledger_sum("acme", "llm_tokens").await, 4);
}

/// `widgets` counted per day on `daily` (the default, 10 a day, hard) and per
/// month on `monthly` (15 a month, hard): one resource, two windows.
const TWO_WINDOW_PLANS: &str = r#"
default_plan = "daily"

[resources.widgets]
decimals = 0

[plans.daily]
price = "0"

[plans.daily.limits.widgets]
window = "day"
limit = "10"
enforcement = "hard"

[plans.monthly]
price = "0"

[plans.monthly.limits.widgets]
window = "month"
limit = "15"
enforcement = "hard"
"#;

/// An account moves from a day-window plan to a month-window plan at an
/// instant between two bursts of consumes sent at once, so one PostgreSQL
/// consume group holds consumes of one (account, resource) over two windows
/// (the store raises TL001 and decides them one at a time). Neither limit is
/// overshot: the consumes dated before the change stay within 10 for the
/// day, and everything together within 15 for the month, which the month
/// consumes then fill exactly.
async fn concurrent_consumes_across_a_plan_change_that_changes_the_window_overshoot_neither_limit(app: TestApp) {
    let now = Utc::now();
    let day_start = now
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc();
    // Three instants on today's UTC day, none in the future by more than a second or two.
    let before = std::cmp::max(day_start, now - Duration::minutes(3));
    let change = before + Duration::seconds(1);
    let after = before + Duration::seconds(2);
    let app = Arc::new(app);
    // A few rounds, each on its own account: how the consumes fall into
    // groups varies from run to run.
    for round in 0..3 {
        let account = format!("acct{round}");
        let set = app
            .put_admin(
                &format!("/v1/accounts/{account}/plan"),
                json!({"plan": "monthly", "effective_at": iso(change)}),
            )
            .await;
        assert_eq!(set.status, 200, "{:?}", set.body);
        let mut tasks = Vec::new();
        for i in 0..40 {
            for (label, at) in [("before", before), ("after", after)] {
                let app = app.clone();
                let account = account.clone();
                tasks.push(tokio::spawn(async move {
                    let reply = consume(&app, &account, "widgets", "1", &format!("{label}{i}"), Some(&iso(at))).await;
                    (label, reply)
                }));
            }
        }
        let mut recorded_before = 0;
        let mut recorded_after = 0;
        for task in tasks {
            let (label, reply) = task.await.unwrap();
            match reply.status {
                200 => {
                    let (used, limit): (i64, i64) = (
                        reply.body["used"].as_str().unwrap().parse().unwrap(),
                        reply.body["limit"].as_str().unwrap().parse().unwrap(),
                    );
                    assert!(used <= limit, "{label}: {:?}", reply.body);
                    let expected = if label == "before" {
                        ("daily", "day")
                    } else {
                        ("monthly", "month")
                    };
                    assert_eq!(
                        (reply.body["plan"].as_str(), reply.body["window"].as_str()),
                        (Some(expected.0), Some(expected.1)),
                        "{label}: {:?}",
                        reply.body
                    );
                    if label == "before" {
                        recorded_before += 1;
                    } else {
                        recorded_after += 1;
                    }
                }
                429 => assert_eq!(reply.code(), "quota_exceeded", "{label}: {:?}", reply.body),
                other => panic!("{label}: status {other}: {:?}", reply.body),
            }
        }
        assert!(
            recorded_before <= 10,
            "{account}: {recorded_before} recorded on the day plan"
        );
        assert_eq!(
            recorded_before + recorded_after,
            15,
            "{account}: the month consumes fill the month limit exactly"
        );
        assert_eq!(app.ledger_sum(&account, "widgets").await, 15, "{account}");
    }
}

both!(plans = TWO_WINDOW_PLANS; concurrent_consumes_across_a_plan_change_that_changes_the_window_overshoot_neither_limit);

both!(
    an_override_stops_applying_exactly_at_its_expires_at_in_check_consume_and_usage,
    of_two_plans_effective_at_one_instant_the_later_assignment_is_in_force_everywhere,
);

/// `expires_at` is exclusive (docs/api.md): one microsecond before it the
/// override applies, at it the plan's limit does, alike in check, in consume
/// (PostgreSQL decides that one in SQL) and in usage.
async fn an_override_stops_applying_exactly_at_its_expires_at_in_check_consume_and_usage(app: TestApp) {
    // In the past by the real clock too, which the CLI reads: the account view
    // calls the override expired. (It was once "today, 10 s after midnight at
    // the earliest", still to come in a run just after midnight.)
    let expires = Utc::now() - Duration::minutes(3);
    let just_before = expires - Duration::microseconds(1);
    let set = app
        .put_override_since(
            "acme",
            "llm_tokens",
            json!({"limit": "3", "expires_at": iso(expires)}),
            expires - Duration::hours(1),
        )
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    assert_eq!(
        check(&app, "acme", "llm_tokens", "1", Some(&iso(just_before))).await["limit"],
        "3"
    );
    assert_eq!(
        check(&app, "acme", "llm_tokens", "1", Some(&iso(expires))).await["limit"],
        "1000"
    );
    let refused = consume(&app, "acme", "llm_tokens", "5", "before", Some(&iso(just_before))).await;
    assert_eq!(
        (refused.status, refused.code()),
        (429, "quota_exceeded"),
        "{:?}",
        refused.body
    );
    let at_expiry = consume(&app, "acme", "llm_tokens", "5", "at", Some(&iso(expires))).await;
    assert_eq!(at_expiry.status, 200, "{:?}", at_expiry.body);
    assert_eq!(at_expiry.body["limit"], "1000");
    for (at, limit) in [(just_before, "3"), (expires, "1000")] {
        let usage = app.get(&format!("/v1/accounts/acme/usage?at={}", iso(at))).await;
        assert_eq!(usage.status, 200, "{:?}", usage.body);
        let row = usage_row(&usage.body, "llm_tokens");
        assert_eq!(row["limit"], limit, "usage at {}: {row:?}", iso(at));
    }
    assert_eq!(app.ledger_sum("acme", "llm_tokens").await, 5);
    // The account view keeps listing it, and says from when it no longer applies.
    app.clock.freeze_at(just_before);
    let before = app.get("/v1/accounts/acme").await;
    app.clock.thaw();
    assert_eq!(before.body["overrides"][0]["expired"], false, "{:?}", before.body);
    let after = app.get("/v1/accounts/acme").await;
    assert_eq!(after.body["overrides"][0]["expired"], true, "{:?}", after.body);
    assert_eq!(after.body["overrides"][0]["limit"], "3", "{:?}", after.body);
    let shown: Value = serde_json::from_slice(&app.cli(&["accounts", "show", "acme"]).stdout).unwrap();
    assert_eq!(shown["overrides"], after.body["overrides"]);
}

/// Two assignments with the same `effective_at`: the later one is in force
/// (docs/api.md: the latest assignment), in check, consume, usage, features
/// and the account view, on both engines and on PostgreSQL's SQL path; an
/// account never assigned, or assigned only from tomorrow, is on the default.
async fn of_two_plans_effective_at_one_instant_the_later_assignment_is_in_force_everywhere(app: TestApp) {
    let now = Utc::now();
    let at = now - Duration::minutes(1);
    for plan in ["pro", "scale"] {
        let set = app
            .put_admin("/v1/accounts/tie/plan", json!({"plan": plan, "effective_at": iso(at)}))
            .await;
        assert_eq!(set.status, 200, "{:?}", set.body);
    }
    assert_eq!(
        check(&app, "tie", "llm_tokens", "1", Some(&iso(at))).await["plan"],
        "scale"
    );
    let consumed = consume(&app, "tie", "llm_tokens", "1", "one", Some(&iso(at))).await;
    assert_eq!(consumed.body["plan"], "scale", "{:?}", consumed.body);
    let usage = app.get(&format!("/v1/accounts/tie/usage?at={}", iso(at))).await;
    assert_eq!(usage.body["plan"], "scale");
    assert_eq!(app.get("/v1/accounts/tie").await.body["plan"], "scale");
    assert_eq!(
        app.get("/v1/accounts/tie/features/multi_user").await.body["allowed"],
        true
    );
    // And back: a third assignment at the same instant wins again.
    app.put_admin("/v1/accounts/tie/plan", json!({"plan": "pro", "effective_at": iso(at)}))
        .await;
    let consumed = consume(&app, "tie", "llm_tokens", "1", "two", Some(&iso(at))).await;
    assert_eq!(consumed.body["plan"], "pro", "{:?}", consumed.body);
    assert_eq!(
        app.get("/v1/accounts/tie/features/git_export").await.body["plan"],
        "pro"
    );

    let newcomer = consume(&app, "newcomer", "llm_tokens", "1", "one", None).await;
    assert_eq!(newcomer.body["plan"], "free", "{:?}", newcomer.body);
    app.put_admin(
        "/v1/accounts/later/plan",
        json!({"plan": "scale", "effective_at": iso(now + Duration::days(1))}),
    )
    .await;
    let later = consume(&app, "later", "llm_tokens", "1", "one", None).await;
    assert_eq!(later.body["plan"], "free", "{:?}", later.body);
    assert_eq!(app.get("/v1/accounts/later").await.body["plan"], "free");
}

/// A plan removed from the catalog while accounts are on it leaves them
/// unlimited; `tally serve` warns at startup with what
/// `plans_missing_from_catalog` finds. Only the assignment in force (or a
/// later one) counts, not history.
async fn plans_missing_from_the_catalog_count_the_accounts_on_them_now_or_later(app: TestApp) {
    let now = Utc::now();
    let day = Duration::days(1);
    let assign = |account: &'static str, plan: &'static str, at: chrono::DateTime<Utc>| {
        let store = app.store.clone();
        async move {
            let account = tally::domain::AccountId::parse(account).unwrap();
            store.assign_plan(&account, plan, at).await.unwrap();
        }
    };
    // The store takes any name; the API and CLI refuse plans the catalog lacks.
    assign("acme", "startup", now - day).await;
    assign("bob", "startup", now - day * 2).await;
    assign("bob", "pro", now - day).await;
    assign("carol", "free", now - day).await;
    assign("carol", "legacy", now + day).await;
    assign("dave", "startup", now - day).await;
    // Two for one future instant: the later-made one wins the tie, so
    // "gone" never takes effect and counts for nothing.
    assign("erin", "gone", now + day).await;
    assign("erin", "pro", now + day).await;

    let counts = |pairs: &[(&str, i64)]| -> Vec<(String, i64)> {
        pairs.iter().map(|(plan, n)| ((*plan).to_owned(), *n)).collect()
    };
    let in_force = app.store.plans_in_force(now).await.unwrap();
    assert_eq!(
        in_force,
        counts(&[("free", 1), ("legacy", 1), ("pro", 2), ("startup", 2)])
    );
    let missing = tally::usage::quota::plans_missing_from_catalog(app.store.as_ref(), &app.catalog, now)
        .await
        .unwrap();
    assert_eq!(missing, counts(&[("legacy", 1), ("startup", 2)]));
    // The CLI's check and usage say so for the account asked about.
    for args in [&["check", "acme", "api_requests"][..], &["usage", "acme"][..]] {
        let output = app.cli(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains("account acme is on plan 'startup', which the catalog does not have: nothing limits it"),
            "{args:?}: {stderr}"
        );
    }
    let fine = app.cli(&["check", "bob", "api_requests"]);
    assert!(fine.status.success());
    assert!(!String::from_utf8_lossy(&fine.stderr).contains("warning"));
    // A day and a half ago bob was on startup, and every other assignment
    // (his move to pro included) was still to come: each counts.
    let earlier = app.store.plans_in_force(now - day - day / 2).await.unwrap();
    assert_eq!(
        earlier,
        counts(&[("free", 1), ("legacy", 1), ("pro", 2), ("startup", 3)])
    );
}

/// Consume's no-overshoot rests on READ COMMITTED (PostgreSQL reads the total
/// after the lock, in a fresh snapshot). Tally's connections ask for it, so a
/// database whose default an operator changed cannot break it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tally_runs_under_read_committed_on_a_postgres_database_that_defaults_to_repeatable_read() {
    use sqlx::Connection;
    let Some(app) = TestApp::spawn(Backend::Postgres).await else {
        return;
    };
    app.execute_raw(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET default_transaction_isolation = %L', \
         current_database(), 'repeatable read'); END $$",
    )
    .await
    .expect("changing the database's default isolation");
    let show = "SHOW transaction_isolation";
    let mut plain = sqlx::PgConnection::connect(&app.database_url).await.unwrap();
    let default: String = sqlx::query_scalar(show).fetch_one(&mut plain).await.unwrap();
    assert_eq!(
        default, "repeatable read",
        "the database's new default applies to other clients"
    );

    let store = tally::store::postgres::PgStore::connect(&app.database_url, app.catalog.clone())
        .await
        .unwrap();
    let tallys: String = sqlx::query_scalar(show).fetch_one(store.pool()).await.unwrap();
    assert_eq!(tallys, "read committed");
}

/// A fault the client did not cause is a 500 (cause to the log), not a 422
/// on a field it never sent.
async fn a_stored_outcome_that_cannot_be_read_back_is_a_500_not_a_validation_error(app: TestApp) {
    let now = match app.backend {
        Backend::Sqlite => "CAST(strftime('%s', 'now') AS INTEGER) * 1000000",
        Backend::Postgres => "now()",
    };
    app.execute_raw(&format!(
        "INSERT INTO entries (account, resource, amount, occurred_at, recorded_at, idempotency_key) \
         VALUES ('acme', 'ai_generations', 1, {now}, {now}, 'broken')"
    ))
    .await
    .unwrap();
    app.execute_raw(
        "INSERT INTO consume_outcomes (entry_id, response) \
         SELECT id, 'not an outcome' FROM entries WHERE idempotency_key = 'broken'",
    )
    .await
    .unwrap();
    let replayed = consume(&app, "acme", "ai_generations", "1", "broken", None).await;
    assert_eq!(replayed.status, 500, "{:?}", replayed.body);
    assert_eq!(replayed.code(), "internal");
    assert_eq!(app.count_entries().await, 1, "nothing new is recorded");
}

/// Review V: near the 64-bit ceiling an unlimited resource's consume was a
/// 429 quota_exceeded "over the hard month limit of ?", and a soft one's
/// "over the hard day limit", while check said allowed. No limit refuses
/// it: the total would pass what Tally counts exactly (DESIGN.md §6), and
/// check and consume now agree on that. Both paths: ai_generations is
/// decided in the database on PostgreSQL, api_requests (a resource some plan
/// rates) by the multi-statement consume.
async fn a_consume_that_would_take_an_unlimited_or_soft_total_past_64_bits_is_422_not_quota_exceeded(app: TestApp) {
    let at = iso(Utc::now() - Duration::minutes(1));
    let largest = "999999999999999";
    for (account, plan, resource) in [("wide", "pro", "ai_generations"), ("busy", "scale", "api_requests")] {
        app.put_admin(
            &format!("/v1/accounts/{account}/plan"),
            json!({"plan": plan, "effective_at": "2026-01-01T00:00:00Z"}),
        )
        .await;
        // 9 223 of the largest amount fit 64 bits of minor units; a 9 224th does not.
        let posted = app.post_entries(batch_at(account, resource, largest, 9_223, &at)).await;
        assert_eq!(posted.status, 200, "{:?}", posted.body);
        let checked = check(&app, account, resource, largest, Some(&at)).await;
        assert_eq!(checked["allowed"], false, "{resource}: {checked:?}");
        let refused = consume(&app, account, resource, largest, "one-more", Some(&at)).await;
        assert_eq!(
            (refused.status, refused.code()),
            (422, "validation_failed"),
            "{:?}",
            refused.body
        );
        assert_eq!(refused.body["error"]["details"]["errors"][0]["field"], "amount");
        let message = refused.body["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with(&format!(
                "amount {largest} would take the month total of {resource} for account '{account}' past 64 bits"
            )) && message.contains("A total past 64 bits"),
            "{message}"
        );
        assert!(retry_after(&refused).is_none());
        assert_eq!(
            app.scalar_i64(&format!("SELECT COUNT(*) FROM entries WHERE account = '{account}'"))
                .await,
            9_223,
            "nothing recorded"
        );
        // A smaller amount that fits still goes in.
        let fits = consume(&app, account, resource, "1", "fits", Some(&at)).await;
        assert_eq!(fits.status, 200, "{:?}", fits.body);
    }
}

both!(
    an_amount_equal_to_the_whole_limit_is_told_to_retry_when_the_window_ends,
    a_consume_up_to_a_soft_limit_warns_limit_reached_and_one_past_it_warns_of_overage,
    an_undated_consume_at_the_instant_a_plan_takes_effect_is_judged_on_that_plan,
    a_consume_dated_at_the_end_of_the_current_window_is_not_held_to_the_limit_in_force_now,
    a_check_right_after_a_rollup_counts_the_last_folded_entry_once,
);

/// An amount equal to the whole limit fits a fresh window, so its refusal
/// says when that window starts; only an amount over the whole limit is
/// told that waiting does not help.
async fn an_amount_equal_to_the_whole_limit_is_told_to_retry_when_the_window_ends(app: TestApp) {
    let month_start = Utc::now()
        .date_naive()
        .with_day(1)
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let late = month_start - Duration::seconds(30);
    app.clock.freeze_at(late);
    let first = consume(&app, "acme", "ai_generations", "1", "a", Some(&iso(late))).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let refused = consume(&app, "acme", "ai_generations", "50", "b", Some(&iso(late))).await;
    assert_eq!(
        (refused.status, refused.code()),
        (429, "quota_exceeded"),
        "{:?}",
        refused.body
    );
    assert_eq!(
        retry_after(&refused),
        Some(30),
        "a fresh month takes 50 of 50: {:?}",
        refused.body
    );
}

/// On `pro`, `llm_tokens` has a soft limit of 50 000 a day: a consume that
/// lands exactly on it is `limit_reached` (no overage is due), the next
/// unit is recorded with `soft_limit_exceeded` — undated (PostgreSQL
/// decides those in its grouped call) and dated alike.
async fn a_consume_up_to_a_soft_limit_warns_limit_reached_and_one_past_it_warns_of_overage(app: TestApp) {
    for (account, dated) in [("undated", false), ("dated", true)] {
        let set = app
            .put_admin(&format!("/v1/accounts/{account}/plan"), json!({"plan": "pro"}))
            .await;
        assert_eq!(set.status, 200, "{:?}", set.body);
        // Dated after the plan change: pro is in force from then.
        let at = dated.then(|| iso(Utc::now()));
        let at = at.as_deref();
        let full = consume(&app, account, "llm_tokens", "50000", "full", at).await;
        assert_eq!(full.status, 200, "{account}: {:?}", full.body);
        assert_eq!(full.body["status"], "exceeded", "{account}: {:?}", full.body);
        assert_eq!(
            full.body["warnings"][0]["code"], "limit_reached",
            "{account}: {:?}",
            full.body
        );
        let over = consume(&app, account, "llm_tokens", "1", "over", at).await;
        assert_eq!(over.status, 200, "{account}: {:?}", over.body);
        assert_eq!(over.body["used"], "50001", "{account}");
        assert_eq!(
            over.body["warnings"][0]["code"], "soft_limit_exceeded",
            "{account}: {:?}",
            over.body
        );
        assert_eq!(app.ledger_sum(account, "llm_tokens").await, 50001, "{account}");
    }
}

/// A plan takes effect at its `effective_at` itself: an undated consume at
/// that very instant is judged on it, as a check then is (free allows 50
/// `ai_generations` a month, pro more).
async fn an_undated_consume_at_the_instant_a_plan_takes_effect_is_judged_on_that_plan(app: TestApp) {
    let effective = (Utc::now() - Duration::seconds(60)).trunc_subsecs(0);
    app.clock.freeze_at(effective);
    let set = app
        .put_admin(
            "/v1/accounts/acme/plan",
            json!({"plan": "pro", "effective_at": iso(effective)}),
        )
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    let reply = consume(&app, "acme", "ai_generations", "51", "k", None).await;
    app.clock.thaw();
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["plan"], "pro");
}

/// A consume dated at the instant the current day ends counts in the next
/// day, under the plan in force then (pro from midnight): it is not also
/// held to today's limit (free: 1 000 `llm_tokens` a day).
async fn a_consume_dated_at_the_end_of_the_current_window_is_not_held_to_the_limit_in_force_now(app: TestApp) {
    let midnight = Utc::now().date_naive().and_hms_opt(0, 0, 0).unwrap().and_utc();
    app.clock.freeze_at(midnight - Duration::milliseconds(1));
    let set = app
        .put_admin(
            "/v1/accounts/acme/plan",
            json!({"plan": "pro", "effective_at": iso(midnight)}),
        )
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    let reply = consume(&app, "acme", "llm_tokens", "2000", "k", Some(&iso(midnight))).await;
    app.clock.thaw();
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body["plan"], "pro");
}

/// The first check of a period in a process reads the folded totals and the
/// tail after the rollup's cursor: the entry the cursor stands on is in the
/// totals and must not be counted again.
async fn a_check_right_after_a_rollup_counts_the_last_folded_entry_once(app: TestApp) {
    let at = iso(Utc::now());
    let posted = app.post_entries(entry_at("acme", "llm_tokens", "5", "e", &at)).await;
    assert_eq!(posted.status, 200, "{:?}", posted.body);
    app.rollup().await;
    assert_eq!(check(&app, "acme", "llm_tokens", "1", Some(&at)).await["used"], "5");
}

/// Two resources with the same per-minute rate.
const TWO_RATED_RESOURCES: &str = r#"
default_plan = "free"

[resources.alpha]
decimals = 0

[resources.beta]
decimals = 0

[plans.free]
price = "0"

[plans.free.limits.alpha]
window = "month"
limit = "unlimited"
rate_per_minute = 2

[plans.free.limits.beta]
window = "month"
limit = "unlimited"
rate_per_minute = 2
"#;

both!(plans = TWO_RATED_RESOURCES; each_resource_has_its_own_rate_budget);

/// A rate is per account and resource: spending `alpha`'s budget leaves
/// `beta`'s whole, though both allow the same 2 a minute.
async fn each_resource_has_its_own_rate_budget(app: TestApp) {
    let alpha = consume(&app, "acme", "alpha", "2", "a", None).await;
    assert_eq!(alpha.status, 200, "{:?}", alpha.body);
    let beta = consume(&app, "acme", "beta", "1", "b", None).await;
    assert_eq!(beta.status, 200, "{:?}", beta.body);
    let alpha_again = consume(&app, "acme", "alpha", "1", "c", None).await;
    assert_eq!(
        (alpha_again.status, alpha_again.code()),
        (429, "rate_limited"),
        "{:?}",
        alpha_again.body
    );
}

both!(
    an_override_reads_expired_from_the_very_instant_of_its_expires_at,
    an_override_expiring_at_the_instant_it_is_set_is_refused,
    the_plan_history_lists_assignments_by_effective_at_not_by_when_they_were_made,
    clearing_an_override_the_account_does_not_have_fails_in_the_cli,
);

/// The account view's `expired` agrees with where the override stops
/// applying: `expires_at` is exclusive, so at that very instant it is expired.
async fn an_override_reads_expired_from_the_very_instant_of_its_expires_at(app: TestApp) {
    // To the microsecond, as stored: frozen at it, the clock reads it exactly.
    let expires = (Utc::now() - Duration::minutes(3)).trunc_subsecs(6);
    let set = app
        .put_override_since(
            "acme",
            "llm_tokens",
            json!({"limit": "3", "expires_at": iso(expires)}),
            expires - Duration::hours(1),
        )
        .await;
    assert_eq!(set.status, 200, "{:?}", set.body);
    app.clock.freeze_at(expires);
    let at_expiry = app.get("/v1/accounts/acme").await;
    app.clock.thaw();
    assert_eq!(at_expiry.body["overrides"][0]["expired"], true, "{:?}", at_expiry.body);
}

/// An override whose `expires_at` is the instant it is set would never apply:
/// refused like one in the past, not stored.
async fn an_override_expiring_at_the_instant_it_is_set_is_refused(app: TestApp) {
    let now = Utc::now().trunc_subsecs(0) - Duration::minutes(1);
    let set = app
        .put_override_since("acme", "llm_tokens", json!({"limit": "3", "expires_at": iso(now)}), now)
        .await;
    assert_eq!((set.status, set.code()), (422, "validation_failed"), "{:?}", set.body);
    assert_eq!(
        set.body["error"]["details"]["errors"][0]["field"], "expires_at",
        "{:?}",
        set.body
    );
    assert_eq!(app.get("/v1/accounts/acme").await.body["overrides"], json!([]));
}

/// `plan_history` is in `effective_at` order, alike on both stores: a
/// backdated assignment made last is listed before one that takes effect
/// later.
async fn the_plan_history_lists_assignments_by_effective_at_not_by_when_they_were_made(app: TestApp) {
    let now = Utc::now();
    for (plan, at) in [("pro", now + Duration::days(1)), ("free", now - Duration::days(1))] {
        let set = app
            .put_admin("/v1/accounts/acme/plan", json!({"plan": plan, "effective_at": iso(at)}))
            .await;
        assert_eq!(set.status, 200, "{:?}", set.body);
    }
    let account = app.get("/v1/accounts/acme").await;
    let plans: Vec<&str> = account.body["plan_history"]
        .as_array()
        .expect("a plan history")
        .iter()
        .map(|a| a["plan"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(plans, ["free", "pro"], "{:?}", account.body);
}

/// `tally accounts clear-override` on a resource the account has no override
/// for fails (exit non-zero, saying so), as the API's DELETE answers 404.
async fn clearing_an_override_the_account_does_not_have_fails_in_the_cli(app: TestApp) {
    let cleared = app.cli(&["accounts", "clear-override", "acme", "llm_tokens"]);
    assert!(!cleared.status.success(), "{cleared:?}");
    assert!(
        String::from_utf8_lossy(&cleared.stderr).contains("has no override"),
        "{cleared:?}"
    );
}
