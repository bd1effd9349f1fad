//! Accounts over HTTP: plans, plan history, overrides, features and usage.

use axum::extract::State;
use axum::routing::{get, put};
use axum::{Json, Router};
use chrono::SubsecRound;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::auth::{Admin, Caller};
use super::error::ApiError;
use super::extract::{Body, NoQuery, Path, QueryParams, parse_json};
use super::{AppState, params};
use crate::domain::amount::{JsonDecimalError, json_decimal_text};
use crate::domain::catalog::{Enforcement, Window};
use crate::domain::entry::parse_setting_instant;
use crate::domain::plan::{Override, parse_limit};
use crate::domain::{AccountId, Catalog, FieldError, ResourceName};
use crate::usage::account::AccountView;
use crate::usage::features::{FeatureView, feature_at};
use crate::usage::quota::{Quotas, UsageReport};

/// The account routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/plans", get(plans))
        .route("/v1/accounts/{account}", get(account))
        .route("/v1/accounts/{account}/plan", put(set_plan))
        .route(
            "/v1/accounts/{account}/overrides/{resource}",
            put(set_override).delete(delete_override),
        )
        .route("/v1/accounts/{account}/features/{feature}", get(feature))
        .route("/v1/accounts/{account}/usage", get(usage))
}

async fn plans(State(state): State<AppState>, _caller: Caller, _: NoQuery) -> Json<Catalog> {
    Json(state.catalog.as_ref().clone())
}

async fn account_view(state: &AppState, account: AccountId) -> Result<AccountView, ApiError> {
    Ok(crate::usage::account::account_view(state.store.as_ref(), &state.catalog, account, state.clock.now()).await?)
}

async fn account(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(query): QueryParams,
    Path(account): Path<String>,
) -> Result<Json<AccountView>, ApiError> {
    let account = params::account(&account)?;
    caller.require_read(&account)?;
    // After the account, as on the other reads of an account: a reader
    // learns nothing of another account from the answer.
    params::reject_unknown(&query, &[])?;
    Ok(Json(account_view(&state, account).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetPlan {
    plan: Option<String>,
    effective_at: Option<String>,
}

fn unknown_plan(catalog: &Catalog, plan: &str) -> ApiError {
    ApiError::from_field_errors(vec![FieldError {
        index: 0,
        field: "plan",
        code: "unknown_plan",
        message: format!("plan '{plan}' is not in the catalog; plans: {}", catalog.plan_names()),
    }])
}

async fn set_plan(
    State(state): State<AppState>,
    _: Admin,
    _: NoQuery,
    Path(account): Path<String>,
    Body(bytes): Body,
) -> Result<Json<AccountView>, ApiError> {
    let request: SetPlan = parse_json(&bytes)?;
    let account = params::account(&account)?;
    let plan = request
        .plan
        .ok_or_else(|| ApiError::missing("plan", "plan is required"))?;
    if !state.catalog.plans.contains_key(&plan) {
        return Err(unknown_plan(&state.catalog, &plan));
    }
    let effective_at = match request.effective_at.as_deref() {
        None => state.clock.now().trunc_subsecs(6),
        Some(raw) => parse_setting_instant(
            "effective_at",
            raw,
            "give the instant the plan takes effect, or leave effective_at out to assign it from now",
        )
        .map_err(|m| ApiError::invalid("effective_at", m))?,
    };
    state.store.assign_plan(&account, &plan, effective_at).await?;
    tracing::info!(account = %account, plan = %plan, "account {account} is on plan {plan} from {effective_at}");
    Ok(Json(account_view(&state, account).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetOverride {
    /// Required (`None`: missing); JSON null means unlimited.
    #[serde(default, deserialize_with = "present")]
    limit: Option<Box<RawValue>>,
    enforcement: Option<String>,
    window: Option<String>,
    expires_at: Option<String>,
}

/// Deserializes a field that is present, JSON null included, as `Some`;
/// with `#[serde(default)]` a missing one is `None`. (A plain `Option`
/// reads null as `None`, and null means unlimited here.)
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(deserializer).map(Some)
}

async fn set_override(
    State(state): State<AppState>,
    _: Admin,
    _: NoQuery,
    Path((account, resource)): Path<(String, String)>,
    Body(bytes): Body,
) -> Result<Json<Override>, ApiError> {
    let request: SetOverride = parse_json(&bytes)?;
    let account = params::account(&account)?;
    let resource = params::resource(&state.catalog, &resource)?;
    let decimals = state.catalog.decimals(resource.as_str());
    let Some(limit) = request.limit else {
        return Err(ApiError::missing(
            "limit",
            "limit is required: a decimal string such as \"5000\", or null for unlimited",
        ));
    };
    let limit = match (limit.get(), json_decimal_text(&limit)) {
        ("null", _) => None,
        (_, Ok(text)) => parse_limit(&text, decimals).map_err(|e| ApiError::invalid("limit", e.to_string()))?,
        (_, Err(JsonDecimalError::BadString(e))) => {
            return Err(ApiError::invalid(
                "limit",
                format!("limit is not a valid JSON string: {e}"),
            ));
        }
        (raw, Err(JsonDecimalError::NotStringOrNumber)) => {
            return Err(ApiError::invalid(
                "limit",
                format!("limit must be a decimal string such as \"5000\", or null for unlimited; got {raw}"),
            ));
        }
    };
    let enforcement = request
        .enforcement
        .as_deref()
        .map(|e| {
            Enforcement::parse(e)
                .ok_or_else(|| ApiError::invalid("enforcement", format!("enforcement {e:?} is not hard or soft")))
        })
        .transpose()?;
    let window = request
        .window
        .as_deref()
        .map(|w| {
            Window::parse(w)
                .ok_or_else(|| ApiError::invalid("window", format!("window {w:?} is not day, month or total")))
        })
        .transpose()?;
    let expires_at = request
        .expires_at
        .as_deref()
        .map(|t| {
            parse_setting_instant(
                "expires_at",
                t,
                "for an override that does not expire, leave expires_at out (or send null)",
            )
            .map_err(|m| ApiError::invalid("expires_at", m))
        })
        .transpose()?;
    let now = state.clock.now().trunc_subsecs(6);
    Override::check_expiry(
        expires_at,
        now,
        &format!("DELETE /v1/accounts/{account}/overrides/{resource}"),
    )
    .map_err(|m| ApiError::invalid("expires_at", m))?;
    let value = Override {
        resource,
        limit,
        enforcement,
        window,
        expires_at,
        updated_at: now,
    };
    state.store.put_override(&account, &value).await?;
    tracing::info!(account = %account, resource = %value.resource, "override set for account {account} on {}", value.resource);
    Ok(Json(value))
}

/// The answer to a `DELETE` of an override, in the order docs/api.md shows.
#[derive(Debug, Serialize)]
pub struct OverrideDeleted {
    /// The account.
    account: AccountId,
    /// The resource whose override went.
    resource: ResourceName,
    /// Always true: a missing override is a 404.
    deleted: bool,
}

impl OverrideDeleted {
    fn new(account: AccountId, resource: ResourceName) -> Self {
        Self {
            account,
            resource,
            deleted: true,
        }
    }
}

async fn delete_override(
    State(state): State<AppState>,
    _: Admin,
    _: NoQuery,
    Path((account, resource)): Path<(String, String)>,
) -> Result<Json<OverrideDeleted>, ApiError> {
    let account = params::account(&account)?;
    // The clock the override's own `updated_at` came from.
    let now = state.clock.now().trunc_subsecs(6);
    let resource = match params::resource(&state.catalog, &resource) {
        Ok(known) => known,
        // A resource dropped from the catalog may still hold an override
        // (it would apply again were the resource put back): let it go.
        Err(unknown) => match ResourceName::parse(&resource) {
            Ok(dropped) if state.store.delete_override(&account, &dropped, now).await? => {
                return Ok(Json(OverrideDeleted::new(account, dropped)));
            }
            _ => return Err(unknown),
        },
    };
    if state.store.delete_override(&account, &resource, now).await? {
        Ok(Json(OverrideDeleted::new(account, resource.clone())))
    } else {
        Err(ApiError::NotFound(format!(
            "account '{account}' has no override for {resource}"
        )))
    }
}

async fn feature(
    State(state): State<AppState>,
    caller: Caller,
    Path((account, feature)): Path<(String, String)>,
    QueryParams(query): QueryParams,
) -> Result<Json<FeatureView>, ApiError> {
    let account = params::account(&account)?;
    caller.require_read(&account)?;
    params::reject_unknown(&query, &["at"])?;
    let at = query
        .get("at")
        .map_or(Ok(state.clock.now()), |raw| params::bound("at", raw))?;
    let history = state.store.plan_history(&account).await?;
    feature_at(&state.catalog, &history, &feature, at)
        .map(Json)
        .map_err(ApiError::NotFound)
}

async fn usage(
    State(state): State<AppState>,
    caller: Caller,
    Path(account): Path<String>,
    QueryParams(query): QueryParams,
) -> Result<Json<UsageReport>, ApiError> {
    let account = params::account(&account)?;
    caller.require_read(&account)?;
    params::reject_unknown(&query, &["at"])?;
    let at = params::at(&query, state.clock.now())?;
    let quotas = Quotas {
        store: state.store.as_ref(),
        catalog: &state.catalog,
    };
    Ok(Json(quotas.usage(&account, at).await?))
}
