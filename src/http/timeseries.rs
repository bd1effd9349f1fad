//! Time series over HTTP: `GET /v1/accounts/{account}/timeseries`.

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::auth::Caller;
use super::error::ApiError;
use super::extract::{Path, QueryParams};
use super::{AppState, params};
use crate::domain::period::Granularity;
use crate::domain::{AccountId, ResourceName};
use crate::usage::timeseries::{Point, SeriesError, timeseries};

/// The usage routes.
pub fn router() -> Router<AppState> {
    Router::new().route("/v1/accounts/{account}/timeseries", get(get_timeseries))
}

#[derive(Serialize)]
struct Series {
    account: AccountId,
    resource: ResourceName,
    granularity: Granularity,
    points: Vec<Point>,
}

async fn get_timeseries(
    State(state): State<AppState>,
    caller: Caller,
    Path(account): Path<String>,
    QueryParams(query): QueryParams,
) -> Result<Json<Series>, ApiError> {
    let account = params::account(&account)?;
    caller.require_read(&account)?;
    params::reject_unknown(&query, &["resource", "granularity", "from", "to"])?;
    let required = |name: &'static str| {
        query
            .get(name)
            .ok_or_else(|| ApiError::missing(name, format!("query parameter {name} is required")))
    };
    let resource = params::readable_resource(&state, Some(&account), required("resource")?).await?;
    let granularity = match query.get("granularity") {
        None => Granularity::Day,
        Some(g) => Granularity::parse(g).map_err(|m| ApiError::invalid("granularity", m))?,
    };
    let from = params::date("from", required("from")?)?;
    let to = params::date("to", required("to")?)?;
    let points = timeseries(
        state.store.as_ref(),
        &state.catalog,
        &account,
        &resource,
        granularity,
        from,
        to,
    )
    .await
    .map_err(|e| match e {
        SeriesError::Range { field, message } => ApiError::invalid(field, message),
        SeriesError::Store(e) => e.into(),
    })?;
    Ok(Json(Series {
        account,
        resource,
        granularity,
        points,
    }))
}
