//! Operator reads: platform stats and top accounts (admin keys only).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};

use super::auth::Admin;
use super::error::ApiError;
use super::extract::QueryParams;
use super::{AppState, params};
use crate::usage::admin::{self, Stats};

/// The admin routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/admin/stats", get(stats))
        .route("/v1/admin/top", get(top))
}

/// The `period` parameter, this month (as of `now`) when absent.
fn period(
    query: &std::collections::HashMap<String, String>,
    now: DateTime<Utc>,
) -> Result<chrono::NaiveDate, ApiError> {
    match query.get("period") {
        Some(raw) => params::month("period", raw),
        None => Ok(admin::this_month(now)),
    }
}

async fn stats(
    State(state): State<AppState>,
    _: Admin,
    QueryParams(query): QueryParams,
) -> Result<Json<Stats>, ApiError> {
    params::reject_unknown(&query, &["period"])?;
    let now = state.clock.now();
    let month = period(&query, now)?;
    Ok(Json(admin::stats(state.store.as_ref(), &state.catalog, month).await?))
}

async fn top(
    State(state): State<AppState>,
    _: Admin,
    QueryParams(query): QueryParams,
) -> Result<Json<admin::TopList>, ApiError> {
    params::reject_unknown(&query, &["resource", "period", "limit"])?;
    // A resource dropped from the catalog is still ranked while the ledger holds it.
    let resource = params::readable_resource(
        &state,
        None,
        query
            .get("resource")
            .ok_or_else(|| ApiError::missing("resource", "query parameter resource is required"))?,
    )
    .await?;
    let month = period(&query, state.clock.now())?;
    let limit = match query.get("limit") {
        None => admin::TOP_DEFAULT,
        Some(raw) => match raw.parse::<u16>() {
            Ok(n) if admin::TOP_LIMITS.contains(&n) => n,
            _ => {
                return Err(ApiError::invalid(
                    "limit",
                    format!(
                        "limit {raw:?} must be an integer from {} to {}",
                        admin::TOP_LIMITS.start(),
                        admin::TOP_LIMITS.end()
                    ),
                ));
            }
        },
    };
    let top = admin::top(
        state.store.as_ref(),
        &state.catalog,
        &resource,
        month,
        usize::from(limit),
    )
    .await?;
    Ok(Json(top))
}
