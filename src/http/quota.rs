//! Quota over HTTP: check (records nothing) and consume (check and record atomically).

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use chrono::SecondsFormat;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::auth::Writer;
use super::error::ApiError;
use super::extract::{Body, NoQuery, malformed_json, parse_json};
use super::{AppState, params};
use crate::domain::amount::{AmountError, JsonDecimalError, json_decimal_text, not_a_decimal};
use crate::domain::catalog::{Enforcement, Window};
use crate::domain::entry::{EntryRules, Validated, parse_timestamp};
use crate::domain::plan::overrides_as_of;
use crate::domain::{AccountId, Amount, Catalog, EntryInput, ResourceName};
use crate::store::too_late_unless_recorded;
use crate::usage::quota::{
    ConsumeError, ConsumeOutcome, QuotaStatus, Quotas, Warning, check_amount, override_at, scheduled_changes,
    whole_seconds_until,
};

/// The quota routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/quota/check", post(check))
        .route("/v1/quota/consume", post(consume))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckRequest {
    account: Option<String>,
    resource: Option<String>,
    amount: Option<Box<RawValue>>,
    at: Option<String>,
}

async fn check(
    State(state): State<AppState>,
    Writer(caller): Writer,
    _: NoQuery,
    Body(bytes): Body,
) -> Result<Json<QuotaStatus>, ApiError> {
    let request: CheckRequest = parse_json(&bytes)?;
    let account = params::account(
        request
            .account
            .as_deref()
            .ok_or_else(|| ApiError::missing("account", "account is required"))?,
    )?;
    caller.require_read(&account)?;
    let resource = params::resource(
        &state.catalog,
        request
            .resource
            .as_deref()
            .ok_or_else(|| ApiError::missing("resource", "resource is required"))?,
    )?;
    let decimals = state.catalog.decimals(resource.as_str());
    let amount = match &request.amount {
        None => Amount::one(decimals),
        Some(raw) => check_amount_of_json(raw, &resource, decimals)?,
    };
    let at = match request.at.as_deref() {
        None => state.clock.now(),
        Some(raw) => parse_timestamp(raw).map_err(|m| ApiError::invalid("at", m))?,
    };
    let quotas = Quotas {
        store: state.store.as_ref(),
        catalog: &state.catalog,
    };
    Ok(Json(quotas.check(&account, &resource, amount, at).await?))
}

/// A check's amount, a JSON string or number ([`check_amount`]).
fn check_amount_of_json(raw: &RawValue, resource: &ResourceName, decimals: u32) -> Result<Amount, ApiError> {
    let text = match json_decimal_text(raw) {
        Ok(text) => text,
        Err(JsonDecimalError::BadString(e)) => return Err(malformed_json(e)),
        Err(JsonDecimalError::NotStringOrNumber) => {
            return Err(ApiError::invalid("amount", not_a_decimal("amount", raw)));
        }
    };
    check_amount(&text, resource, decimals).map_err(|message| ApiError::invalid("amount", message))
}

/// What a consume older than the late-arrival horizon is told: a backfill
/// records without checking a limit, so it is not a consume's way.
const CONSUME_TOO_LATE: &str = ": a consume is judged in the window it is dated in, and that far back none is \
                                open to consumes; date it within the horizon or leave occurred_at out (an \
                                operator can still record old usage as an entry, unchecked, with `tally import \
                                --allow-late`)";

/// A consume's answer to an amount of 0.
const CONSUME_OF_ZERO: &str = "amount 0 records no usage: a consume takes the positive amount used; to see what \
                               is left without recording, POST /v1/quota/check; to free room, post a negative \
                               entry to /v1/entries";

/// Refuses a consume amount that is not strictly positive (a check has
/// [`check_amount`]).
fn positive(amount: Amount) -> Result<Amount, ApiError> {
    if amount.minor() <= 0 {
        return Err(ApiError::invalid(
            "amount",
            format!(
                "amount {amount} must be positive: consume and check count usage; post a negative entry to /v1/entries to correct"
            ),
        ));
    }
    Ok(amount)
}

#[derive(Serialize)]
struct ConsumeResponse {
    #[serde(flatten)]
    status: QuotaStatus,
    entry_id: i64,
    warnings: Vec<Warning>,
}

async fn consume(
    State(state): State<AppState>,
    Writer(caller): Writer,
    _: NoQuery,
    Body(bytes): Body,
) -> Result<Json<ConsumeResponse>, ApiError> {
    let input: EntryInput = parse_json(&bytes)?;
    // The account first: a key bound to another account learns nothing
    // about its body (403 before any 422).
    if let Some(account) = input.account.as_deref().and_then(|a| AccountId::parse(a).ok()) {
        caller.require_write(&account)?;
    }
    let rules = EntryRules {
        too_late: CONSUME_TOO_LATE,
        ..state.entry_rules()
    };
    let entry = match input.validate_apart_from_horizon(0, rules).map_err(|mut errors| {
        // An entry's words for 0 ("leave out an entry…") do not fit a consume.
        let zero = AmountError::Zero.to_string();
        for error in errors.iter_mut().filter(|e| e.field == "amount" && e.message == zero) {
            error.message = CONSUME_OF_ZERO.to_owned();
        }
        ApiError::from_field_errors(errors)
    })? {
        Validated::Valid(entry) => entry,
        // The same key after a success returns the first outcome, however
        // old its entry has grown since (review AP); the store replays it.
        Validated::OnlyTooLate(entry, late) => {
            let entries = std::slice::from_ref(&entry);
            let refused = too_late_unless_recorded(state.store.as_ref(), entries, vec![late]).await?;
            if !refused.is_empty() {
                return Err(ApiError::from_field_errors(refused));
            }
            entry
        }
    };
    positive(entry.amount)?;
    let quotas = Quotas {
        store: state.store.as_ref(),
        catalog: &state.catalog,
    };
    let now = state.clock.now();
    match quotas.consume(&entry, &state.rates, now).await {
        Ok(ConsumeOutcome::Recorded {
            status,
            entry_id,
            warnings,
            replayed,
        }) => {
            if !replayed {
                state.metrics.entries_ingested(1);
            }
            Ok(Json(ConsumeResponse {
                status,
                entry_id,
                warnings,
            }))
        }
        Ok(ConsumeOutcome::QuotaExceeded {
            status,
            retry_after,
            in_force_now,
        }) => {
            // Read again, on this path only, for two questions: who set the
            // limit (a refusal is not the plan's doing when an account
            // override decided it) and whether a scheduled change lets the
            // consume through sooner. Without it the refusal is still answered.
            let history = state.store.plans_and_override_changes(&entry.account).await;
            let judged_at = if in_force_now { now } else { entry.occurred_at };
            let by_override = history.as_ref().is_ok_and(|(_, changes)| {
                override_at(&overrides_as_of(changes, judged_at), &entry.resource, judged_at).is_some()
            });
            // A consume dated "now" that a scheduled change lets through
            // is told to come back then, not when the window ends; when no
            // fresh window would take it (the amount alone is over the
            // limit), a change at any later instant is looked for. So is a
            // dated consume refused by the limit in force now: that limit
            // changes as a consume made now would see it. One refused by the
            // limit at its own date is judged there whenever it is sent. A
            // total has no Retry-After (the contract), so none is looked for.
            let sooner = match &history {
                _ if (entry.occurred_at_given && !in_force_now) || status.window == Window::Total => Ok(None),
                Ok((plans, changes)) => quotas
                    .passes_after_a_scheduled_change(
                        &entry.account,
                        &entry.resource,
                        entry.amount,
                        (plans, changes),
                        now,
                        retry_after.and(status.period_end),
                        entry.occurred_at_given.then_some(entry.occurred_at),
                    )
                    .await
                    .map_err(|error| crate::telemetry::cause_chain(&error)),
                Err(error) => Err(crate::telemetry::cause_chain(error)),
            };
            let sooner = sooner.unwrap_or_else(|error| {
                tracing::warn!(
                    account = %entry.account,
                    error = %error,
                    "cannot look for a scheduled limit change of account '{}': {error}",
                    entry.account
                );
                None
            });
            // No change lets it through in this window. With one scheduled,
            // the next windows' limits need not be this one's (review AR: a
            // downgrade at the window's end; a raise too small for what is
            // used now, which a fresh window takes): look at the first few.
            // Some(None): looked, and none takes it. A consume dated by its
            // caller keeps its date, so only its own window counts.
            let scheduled = history
                .as_ref()
                .is_ok_and(|(plans, changes)| !scheduled_changes(&entry.resource, (plans, changes), now).is_empty());
            let later = match &history {
                Ok((plans, changes))
                    if sooner.is_none() && scheduled && !entry.occurred_at_given && status.window != Window::Total =>
                {
                    quotas
                        .passes_in_a_later_window(&entry.account, &entry.resource, entry.amount, (plans, changes), now)
                        .await
                        .inspect_err(|error| {
                            let error = crate::telemetry::cause_chain(error);
                            tracing::warn!(
                                account = %entry.account,
                                error = %error,
                                "cannot look for a later window that takes a consume of account '{}': {error}",
                                entry.account
                            );
                        })
                        .ok()
                }
                _ => None,
            };
            let retry_after = match (&sooner, &later) {
                (Some(change), _) => whole_seconds_until(now, change.at),
                (None, Some(Some(window))) => whole_seconds_until(now, window.at),
                (None, Some(None)) => None,
                (None, None) => retry_after,
            };
            // A dated consume sent again once its date is past the
            // late-arrival horizon is refused as too late: no wait helps it.
            let too_late_by_then = |seconds: u64| {
                let then = i64::try_from(seconds)
                    .ok()
                    .and_then(chrono::Duration::try_seconds)
                    .and_then(|wait| now.checked_add_signed(wait));
                entry.occurred_at_given && then.is_none_or(|then| then > entry.occurred_at + state.late_horizon)
            };
            let past_the_horizon = retry_after.is_some_and(too_late_by_then);
            let retry_after = retry_after.filter(|_| !past_the_horizon);
            let sooner = sooner.filter(|_| !past_the_horizon);
            let set_by = if by_override {
                format!(
                    "set by an override of account '{}' (on plan '{}')",
                    entry.account, status.plan
                )
            } else {
                format!("on plan '{}'", status.plan)
            };
            let set_by = if in_force_now {
                format!(
                    "{set_by} in force now (a consume dated {} is in the current window, so the limit in force \
                     when it is recorded holds it too, as well as the one at its date)",
                    entry.occurred_at.to_rfc3339_opts(SecondsFormat::Secs, true)
                )
            } else {
                set_by
            };
            let message = if let Some(change) = &sooner {
                let what = match (&change.plan_takes_effect, change.override_expires) {
                    (Some(plan), true) => format!(
                        "account '{}' moves to plan '{plan}' and its override for {} expires",
                        entry.account, entry.resource
                    ),
                    (Some(plan), false) => format!("account '{}' moves to plan '{plan}'", entry.account),
                    (None, _) => format!(
                        "the override of account '{}' for {} expires",
                        entry.account, entry.resource
                    ),
                };
                let then = &change.status;
                let limit = match (&then.limit, then.enforcement) {
                    (None, _) => "unlimited".to_owned(),
                    (Some(limit), Enforcement::Hard) => format!("{} limit {limit}", then.window.as_str()),
                    (Some(limit), Enforcement::Soft) => format!(
                        "soft {} limit {limit}: usage past it is billed as overage",
                        then.window.as_str()
                    ),
                };
                format!(
                    "{} would exceed the hard {} limit of {} for {} {set_by} ({} used); {what} at {} (in {} s), \
                     and then it passes ({limit})",
                    entry.amount,
                    status.window.as_str(),
                    status.limit.as_deref().unwrap_or("?"),
                    status.resource,
                    status.used,
                    change.at.to_rfc3339_opts(SecondsFormat::Secs, true),
                    retry_after.unwrap_or_default(),
                )
            } else if status.limit.as_deref() == Some("0") && !in_force_now && !matches!(later, Some(Some(_))) {
                // Not a matter of consuming less: nothing of it can pass.
                not_included(&state.catalog, &entry.account, &status, by_override)
            } else {
                format!(
                    "{} would exceed the hard {} limit of {} for {} {set_by} ({} used){}",
                    entry.amount,
                    status.window.as_str(),
                    status.limit.as_deref().unwrap_or("?"),
                    status.resource,
                    status.used,
                    match retry_after {
                        Some(s) if matches!(later, Some(Some(_))) => {
                            let window = later.as_ref().and_then(Option::as_ref).expect("a later window");
                            format!(
                                "; with the changes scheduled for account '{}', it passes from {} (in {s} s): {} \
                                 limit {} on plan '{}', {} used then",
                                entry.account,
                                window.at.to_rfc3339_opts(SecondsFormat::Secs, true),
                                window.status.window.as_str(),
                                window.status.limit.as_deref().unwrap_or("unlimited"),
                                window.status.plan,
                                window.status.used,
                            )
                        }
                        Some(s) if in_force_now => format!(
                            "; that limit holds a consume dated in its window until the window ends at {} (in {s} s), \
                             and after that only the limit at its date does",
                            status
                                .period_end
                                .map(|end| end.to_rfc3339_opts(SecondsFormat::Secs, true))
                                .unwrap_or_default()
                        ),
                        Some(s) => format!(
                            "; the window resets at {} (in {s} s)",
                            status
                                .period_end
                                .map(|end| end.to_rfc3339_opts(SecondsFormat::Secs, true))
                                .unwrap_or_default()
                        ),
                        None if status.window == Window::Total =>
                            "; free some (a negative entry) or raise the limit".into(),
                        None if past_the_horizon => format!(
                            "; by the time anything would let it through, occurred_at would be older than the \
                             late-arrival horizon ({} days) and the consume refused as too late, so waiting does not \
                             help",
                            state.late_horizon.num_days()
                        ),
                        None if status.period_end.is_some_and(|end| end <= now) => format!(
                            "; occurred_at is in a window that closed at {}, so waiting does not help",
                            status
                                .period_end
                                .map(|end| end.to_rfc3339_opts(SecondsFormat::Secs, true))
                                .unwrap_or_default()
                        ),
                        None if matches!(later, Some(None)) => format!(
                            "; changes are scheduled for account '{}', but neither this window's end nor the windows \
                             after them take it (the first few looked at), so waiting does not help: consume less at \
                             a time or raise the limit",
                            entry.account
                        ),
                        None => "; the amount alone is over the whole limit, so no later window takes it: \
                             consume less at a time or raise the limit"
                            .into(),
                    }
                )
            };
            Err(ApiError::TooManyRequests {
                code: "quota_exceeded",
                message,
                details: super::error::raw(&status),
                retry_after,
            })
        }
        Ok(ConsumeOutcome::RateLimited {
            retry_after,
            per_minute,
        }) => Err(ApiError::TooManyRequests {
            code: "rate_limited",
            message: format!(
                "{} for account '{}' is limited to {per_minute} per minute; retry in {retry_after} s",
                entry.resource, entry.account
            ),
            details: super::error::raw(&serde_json::json!({ "per_minute": per_minute })),
            retry_after: Some(retry_after),
        }),
        Err(e @ (ConsumeError::LargerThanRate { .. } | ConsumeError::PastSixtyFourBits { .. })) => {
            Err(ApiError::invalid("amount", e.to_string()))
        }
        Err(ConsumeError::Store(e)) => Err(e.into()),
    }
}

/// The refusal of a consume under a limit of 0: the plan (or an override)
/// leaves the resource out, and the way forward is another plan or an
/// override, never a smaller amount or a wait.
fn not_included(catalog: &Catalog, account: &AccountId, status: &QuotaStatus, by_override: bool) -> String {
    let resource = &status.resource;
    let override_path = format!("/v1/accounts/{account}/overrides/{resource}");
    if by_override {
        return format!(
            "an override of account '{account}' sets the {resource} limit to 0 (on plan '{}'), so no amount of it \
             can be consumed; raise the override (PUT {override_path}) or delete it to use the plan's limit \
             (DELETE {override_path})",
            status.plan
        );
    }
    let including: Vec<&str> = catalog
        .plans
        .iter()
        .filter(|(name, _)| name.as_str() != status.plan)
        .filter(|(_, plan)| {
            plan.limits
                .iter()
                .find(|(r, _)| r.as_str() == resource)
                .is_none_or(|(_, limit)| limit.limit.is_none_or(|l| l.minor() > 0))
        })
        .map(|(name, _)| name.as_str())
        .collect();
    let move_to = match including.as_slice() {
        [] => String::new(),
        plans => format!(
            "move account '{account}' to a plan that does ({}) with PUT /v1/accounts/{account}/plan, or ",
            plans.join(", ")
        ),
    };
    format!(
        "plan '{}' does not include {resource} (its limit is 0), so no amount of it can be consumed; {move_to}give \
         the account a limit of its own with PUT {override_path}",
        status.plan
    )
}
