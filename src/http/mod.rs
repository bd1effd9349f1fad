//! The HTTP API (axum). Each module has a `router()`; [`router`] merges them.

pub mod accounts;
pub mod admin;
pub mod auth;
pub mod entries;
pub mod error;
pub mod extract;
pub mod operations;
pub mod params;
pub mod quota;
pub mod timeseries;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::{Router, middleware};
use chrono::Duration;
use tokio::net::TcpListener;
use tower_http::trace::TraceLayer;

use crate::clock::Clock;
use crate::domain::{Catalog, KeySecret};
use crate::store::Store;
use crate::telemetry::Metrics;
use crate::usage::rate_limit::RateLimits;
use error::ApiError;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The database.
    pub store: Arc<dyn Store>,
    /// Resources and plans.
    pub catalog: Arc<Catalog>,
    /// Hash of `TALLY_ADMIN_KEY`, when set.
    pub admin_key_hash: Option<String>,
    /// Entries older than this are `too_late`.
    pub late_horizon: Duration,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Per-minute rate limiters (in process).
    pub rates: Arc<RateLimits>,
    /// Keys recently authenticated (see [`auth::KEY_CACHE_TTL`]).
    pub keys: Arc<auth::KeyCache>,
    /// "Now" for the handlers (tests freeze it).
    pub clock: Clock,
}

impl AppState {
    /// State over a store, with the settings that matter to handlers.
    pub fn new(store: Arc<dyn Store>, catalog: Arc<Catalog>, admin_key: Option<&str>, late_horizon: Duration) -> Self {
        Self {
            store,
            catalog,
            admin_key_hash: admin_key.map(|k| KeySecret::from_presented(k).hash()),
            late_horizon,
            metrics: Arc::new(Metrics::default()),
            rates: Arc::new(RateLimits::default()),
            keys: Arc::new(auth::KeyCache::default()),
            clock: Clock::default(),
        }
    }
}

/// All routes, with request tracing. (Bodies are limited where they are
/// read, by `extract::Body`, which every route that takes one uses.)
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(entries::router())
        .merge(timeseries::router())
        .merge(quota::router())
        .merge(accounts::router())
        .merge(admin::router())
        .merge(operations::router())
        .fallback(not_found)
        // After the merges: it applies to the routes present when called.
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            operations::count_requests,
        ))
        .layer(
            TraceLayer::new_for_http()
                // At info, under this crate's name, so the default filter
                // keeps it: a 5xx logged inside names its request (the
                // account is in the path).
                .make_span_with(|request: &axum::http::Request<_>| {
                    tracing::info_span!("request", method = %request.method(), path = %request.uri().path())
                })
                // ApiError logs each 5xx with its cause; tower_http's line
                // would only repeat the status.
                .on_failure(()),
        )
        .with_state(state)
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!(
        "no route for {uri}; the endpoints are listed in docs/api.md (all under /v1/, plus /healthz and /metrics)"
    ))
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "{method} is not allowed on {}; the Allow header lists the methods it takes",
        uri.path()
    ))
}

/// A bound server, ready to run. Tests build it on port 0 and read the port.
pub struct Server {
    listener: TcpListener,
    router: Router,
    /// How long requests in flight may finish after a stop request.
    grace: std::time::Duration,
}

impl Server {
    /// Binds `listen` (port 0 picks a free port).
    pub async fn bind(listen: SocketAddr, grace: std::time::Duration, state: AppState) -> std::io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        Ok(Self {
            listener,
            router: router(state),
            grace,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then finishes requests in flight for
    /// at most the grace period: a client that never sends the rest of its
    /// body must not keep the process from stopping.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> std::io::Result<()> {
        let stopping = Arc::new(tokio::sync::Notify::new());
        let signalled = stopping.clone();
        let serving = axum::serve(self.listener, self.router).with_graceful_shutdown(async move {
            shutdown.await;
            signalled.notify_one();
        });
        let grace = self.grace;
        tokio::select! {
            served = std::future::IntoFuture::into_future(serving) => served,
            () = async {
                stopping.notified().await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(
                    grace_seconds = grace.as_secs(),
                    "requests still in flight {} s after the stop request; stopping without them",
                    grace.as_secs()
                );
                Ok(())
            }
        }
    }
}
