//! Operations: liveness/readiness and Prometheus metrics (no key needed).

use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;

use super::AppState;
use crate::telemetry::HttpLabels;
use crate::usage::rollup_lag_seconds;

/// `GET /healthz` and `GET /metrics`.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
}

/// How long `/healthz` and `/metrics` wait for the database: an outage is
/// reported within it, inside Prometheus' 10 s scrape timeout and a probe
/// given a few seconds, rather than after the pool's acquire timeout (3 s on
/// PostgreSQL, 30 s on SQLite).
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The rollup lag, or why the database could not say within [`PROBE_TIMEOUT`].
async fn probe_lag(state: &AppState) -> Result<i64, String> {
    match tokio::time::timeout(PROBE_TIMEOUT, rollup_lag_seconds(state.store.as_ref(), Utc::now())).await {
        Ok(Ok(lag)) => Ok(lag),
        Ok(Err(e)) => Err(crate::telemetry::cause_chain(&e)),
        Err(_) => {
            let waited = format!("no answer within {} s", PROBE_TIMEOUT.as_secs());
            Err(match state.store.why_unreachable().await {
                Some(cause) => format!("{waited}; a new connection fails: {cause}"),
                None => waited,
            })
        }
    }
}

/// The healthz answer, in the contract's order.
#[derive(serde::Serialize)]
struct Health {
    status: &'static str,
    database: &'static str,
    /// `null` when the database does not answer.
    rollup_lag_seconds: Option<i64>,
    rollup_failures_in_a_row: i64,
}

/// 200 while requests can be served; `status` is `degraded` when the latest
/// rollup run of this process failed (reads stay exact, but the unfolded
/// tail grows until it runs again), 503 when the database does not answer.
async fn healthz(State(state): State<AppState>) -> Response {
    let failures_in_a_row = state.metrics.rollup_failures_in_a_row.get();
    match probe_lag(&state).await {
        Ok(lag) => (
            StatusCode::OK,
            Json(Health {
                status: if failures_in_a_row > 0 { "degraded" } else { "ok" },
                database: "ok",
                rollup_lag_seconds: Some(lag),
                rollup_failures_in_a_row: failures_in_a_row,
            }),
        )
            .into_response(),
        Err(cause) => {
            tracing::warn!(error = %cause, "health check: database unavailable: {cause}");
            // As every other 503 (ApiError::Unavailable): try again shortly.
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(axum::http::header::RETRY_AFTER, "1")],
                Json(Health {
                    status: "degraded",
                    database: "unavailable",
                    rollup_lag_seconds: None,
                    rollup_failures_in_a_row: failures_in_a_row,
                }),
            )
                .into_response()
        }
    }
}

async fn metrics(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    // The lag is read at scrape time, so it is right even with jobs off here.
    match probe_lag(&state).await {
        Ok(lag) => {
            state.metrics.rollup_lag_seconds.set(lag);
            state.metrics.database_up.set(1);
        }
        // Not a 0 lag: an outage must not look like a rollup that keeps up.
        Err(_) => {
            state.metrics.database_up.set(0);
        }
    }
    // OpenMetrics for a scraper that asks for it (Prometheus does), the
    // classic text format (API.md's "Prometheus text format") for any other.
    let wants_openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.contains("application/openmetrics-text"));
    if wants_openmetrics {
        (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            state.metrics.render(),
        )
            .into_response()
    } else {
        (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            state.metrics.render_classic(),
        )
            .into_response()
    }
}

/// Counts every request by its route pattern (not the raw path, which would
/// make one series per account), method and status.
pub async fn count_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    // The standard methods by name; any other a client invents is "other",
    // or each would add a series for as long as the process lives.
    let method = match request.method().as_str() {
        known @ ("GET" | "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD" | "OPTIONS") => known.to_owned(),
        _ => "other".to_owned(),
    };
    let response = next.run(request).await;
    state
        .metrics
        .http_requests
        .get_or_create(&HttpLabels {
            route,
            method,
            status: response.status().as_u16(),
        })
        .inc();
    response
}
